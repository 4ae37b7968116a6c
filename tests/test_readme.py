"""The README and docs/usage.md stay true to the CLI: every command they show exists with the
options they give it, and the README's command list is `cli.py --help`'s."""

from __future__ import annotations

import re
import shlex

import pytest

import cli
from tests.helpers import REPO_ROOT

DOCUMENTS = ("README.md", "docs/usage.md", "examples/robot_logs/README.md")
README_SIZE_GOAL = 13_000  # bytes: a reader gets the first screen in a minute and the rest soon after


def shown_commands(text: str) -> list[str]:
    """Every `python cli.py ...` (or `cli.py ...` under torchrun) line, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        match = re.search(r"(?:python |torchrun .*?)cli\.py (.*)", line)
        if match:
            shown = match.group(1).split("`")[0]  # inline code ends at its backtick
            found.append(shown.split("  #")[0].split("   (")[0].strip())
    return found


def option_names(command) -> set[str]:
    names = {"--help"}
    for parameter in command.params:
        names.update(getattr(parameter, "opts", ()))
        names.update(getattr(parameter, "secondary_opts", ()))
    return names


def check(line: str) -> list[str]:
    """What is wrong with one shown command line (a synopsis's [--x A|B] forms included)."""
    tokens = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
    if not tokens or tokens[0].startswith("-") or tokens[0] == "...":  # "cli.py ...": any command
        return [] if tokens in ([], ["--help"], ["..."]) else [f"{line!r}: no command"]
    name, rest = tokens[0], tokens[1:]
    if name not in cli.cli.commands:
        return [f"{line!r}: no command {name!r}"]
    known = option_names(cli.cli.commands[name])
    flags = {part.split("=")[0] for token in rest for part in token.split("|") if part.startswith("--")}
    return [f"{line!r}: {name} has no option {flag}" for flag in sorted(flags - known)]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_shown_exists_with_its_options(document):
    lines = shown_commands((REPO_ROOT / document).read_text())
    assert len(lines) >= 5, lines  # the scan really found them
    problems = [problem for line in lines for problem in check(line)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_wrong_option_and_command():
    assert check("train --steps 5 --warmup 2") == []
    assert check("train --stpes 5") == ["'train --stpes 5': train has no option --stpes"]
    assert check("export [--fp16 | --int9]") == ["'export [--fp16 | --int9]': export has no option --int9"]
    assert check("deploy --x") == ["'deploy --x': no command 'deploy'"]


def test_the_readme_command_list_is_the_clis_help():
    text = (REPO_ROOT / "README.md").read_text()
    block = text.split("    python cli.py --help\n\n", 1)[1].split("\n\n", 1)[0]
    listed = [re.match(r"    (\S+)\s+(.*)", line).groups() for line in block.splitlines()]
    expected = [(name, command.get_short_help_str(limit=100)) for name, command in cli.cli.commands.items()]
    assert listed == expected


def test_the_readme_first_screen_and_size():
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.encode()) <= README_SIZE_GOAL, len(text.encode())
    first = text.split("\n## ", 3)
    assert first[1].startswith("What you get") and first[2].startswith("Quick start")
    for needed in ("bash scripts/quickstart.sh", "bash scripts/test.sh", "Policy(backend"):
        assert needed in text
