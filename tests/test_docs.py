"""Every document and test file the code, scripts and README cite lives in the repository, down to the section
anchor or the test function."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO_ROOT

CITATION = re.compile(r"(?<![\w/.-])(docs/[\w./-]+\.md)(#[\w-]+)?")
TEST_CITATION = re.compile(r"(?<![\w/.-])(tests/test_\w+\.py)(::\w+)?")
# Documents of other projects cited by their own paths (onnx-tensorrt's docs/operators.md).
FOREIGN = ("onnx-tensorrt",)
SOURCES = ("*.py", "*.c", "*.h", "*.toml", "*.sh", "*.md")
SKIPPED_DIRS = {".git", ".venv", "runs", "build", "__pycache__"}


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    found = set()
    for line in markdown.splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def cited_files():
    for pattern in SOURCES:
        for path in REPO_ROOT.rglob(pattern):
            parts = path.relative_to(REPO_ROOT).parts
            # Hidden folders (.git, .venv, .venv-lint of the GPU type check) hold other projects' files.
            if not SKIPPED_DIRS.intersection(parts) and not any(part.startswith(".") for part in parts[:-1]):
                yield path


def test_anchor_rule():
    assert anchors("## Q/DQ placement\n### Stream form (step)\n") == {"qdq-placement", "stream-form-step"}


def test_every_citation_resolves():
    broken, count = [], 0
    for path in cited_files():
        text = path.read_text(errors="replace")
        for match in CITATION.finditer(text):
            if any(name in text[max(0, match.start() - 40):match.start()] for name in FOREIGN):
                continue
            count += 1
            document = REPO_ROOT / match.group(1)
            if not document.is_file():
                broken.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0)} (no such file)")
            elif match.group(2) and match.group(2)[1:] not in anchors(document.read_text()):
                broken.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0)} (no such section)")
    assert count > 20, count  # the walk really saw the citations
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("name", ["DMM_SPEC", "DESIGN.md", "deploy_notes", "STYLE.md", "shared/"])
def test_no_citation_of_documents_outside_the_repository(name):
    offenders = [str(p.relative_to(REPO_ROOT)) for p in cited_files()
                 if name in p.read_text(errors="replace") and p.name != "test_docs.py"]
    assert not offenders, offenders


def test_every_cited_test_file_exists():
    broken, count = [], 0
    for path in cited_files():
        for match in TEST_CITATION.finditer(path.read_text(errors="replace")):
            count += 1
            test_file = REPO_ROOT / match.group(1)
            if not test_file.is_file():
                broken.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0)} (no such file)")
            elif match.group(2) and not re.search(rf"^def {match.group(2)[2:]}\(", test_file.read_text(), re.M):
                broken.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0)} (no such test)")
    assert count > 10, count  # the walk really saw the citations
    assert not broken, "\n".join(broken)
