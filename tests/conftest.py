"""Shared fixtures: a real checkpoint on disk (untrained weights, fixed seed), its engines, and env hygiene."""

from __future__ import annotations

import re

import pytest

from contract.errors import DMMError
from tests.helpers import export_c, export_engines, write_checkpoint


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach for the network: the hub fails fast instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory):
    """Path of a hopper model.pt with untrained, seeded weights."""
    return write_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def engines(checkpoint_path, tmp_path_factory):
    """mode -> exported .onnx of ``checkpoint_path``."""
    return export_engines(checkpoint_path, tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def c_export(checkpoint_path, tmp_path_factory):
    """hopper-c.c of ``checkpoint_path`` (export --target c; hopper-c.h and hopper-c.json beside it)."""
    return export_c(checkpoint_path, tmp_path_factory.mktemp("c-export"))


# --- The one error grammar: every DMMError a test raises is checked for its form. ---

_OLD_GRAMMAR = re.compile(r"\|\s*(received|expected)\b")


def error_form_problems(error: DMMError) -> list[str]:
    """What is wrong with ``error``'s form (empty when it reads ``received; expected ...; fix`` on one line)."""
    problems = []
    for part in ("received", "expected", "fix"):
        text = getattr(error, part, "")
        if not text:
            problems.append(f"no {part} part")
        elif "\n" in text:
            problems.append(f"the {part} part spans lines")
        elif _OLD_GRAMMAR.search(text):
            problems.append(f"the {part} part uses the old '| received | expected' form")
    if any("; " in getattr(error, part, "") for part in ("received", "expected", "fix")):
        problems.append("a '; ' inside a part (the line has exactly two, between the parts)")
    if error.expected.lower().startswith("expected"):
        problems.append("the expected part starts with 'expected' (the grammar adds it)")
    if error.fix.lower().startswith("expected"):
        problems.append("the fix part is another expectation, not what to do")
    return problems


@pytest.fixture(autouse=True)
def _errors_in_one_grammar(request, monkeypatch):
    """Fail the test (at teardown) when it raised a DMMError not in the project's one grammar."""
    if request.node.get_closest_marker("malformed_errors"):
        yield
        return
    made: list[DMMError] = []
    original = DMMError.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(DMMError, "__init__", recording_init)
    yield
    bad = [f"{'; '.join(problems)}: {str(error)[:200]!r}" for error in made if (problems := error_form_problems(error))]
    assert not bad, "DMMError not in the form 'received; expected ...; what to do':\n" + "\n".join(bad)
