"""One error grammar: every DMMError reads ``<received>; expected <expected>; <what to do>``.

Two checks cover the class, not examples: every ``DMMError(...)`` call in the project's code
passes the three parts (read from the source, so a path no test reaches is covered too), and
tests/conftest.py checks the form of every DMMError that any test raises.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from contract.errors import DMMError, check_dims, describe_error
from tests.conftest import error_form_problems

ROOT = Path(__file__).resolve().parents[1]
PROJECT_CODE = ("cli.py", "contract", "dmm_train", "export", "runtime", "calibration", "bench", "examples", "scripts")
PARTS = ("received", "expected", "fix")


def project_files() -> list[Path]:
    files = []
    for entry in PROJECT_CODE:
        path = ROOT / entry
        files.extend([path] if path.is_file() else sorted(path.rglob("*.py")))
    return [path for path in files if path.suffix == ".py"]


def calls_without_three_parts(path: Path) -> list[str]:
    """``file:line`` of each DMMError(...) call in ``path`` that does not pass received, expected and fix."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if name != "DMMError":
            continue
        keywords = [keyword.arg for keyword in node.keywords]
        starred = any(isinstance(arg, ast.Starred) for arg in node.args) or None in keywords
        given = PARTS[:len(node.args)] + tuple(keywords)
        if starred or sorted(given) != sorted(PARTS):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_raise_in_the_code_passes_received_expected_and_fix():
    offenders = [where for path in project_files() for where in calls_without_three_parts(path)]
    assert not offenders, f"{len(offenders)} DMMError calls without the three parts:\n" + "\n".join(offenders)


def test_the_static_check_sees_a_one_part_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from contract.errors import DMMError\nraise DMMError('something went wrong')\n")
    good = tmp_path / "good.py"
    good.write_text("raise DMMError('--steps 0', 'a positive integer', fix='pass --steps 1 or more')\n")
    assert [where.split(":")[1] for where in calls_without_three_parts_at(bad)] == ["2"]
    assert calls_without_three_parts_at(good) == []


def calls_without_three_parts_at(path: Path) -> list[str]:
    """`calls_without_three_parts` for a file outside the project (paths shown whole)."""
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return calls_without_three_parts(path)
    finally:
        ROOT = saved


def test_message_reads_received_expected_fix_on_one_line():
    error = DMMError("--steps 0", "a positive integer", "pass --steps 1 or more")
    assert str(error) == "--steps 0; expected a positive integer; pass --steps 1 or more"
    assert (error.received, error.expected, error.fix) == ("--steps 0", "a positive integer", "pass --steps 1 or more")
    assert error_form_problems(error) == []


@pytest.mark.malformed_errors
@pytest.mark.parametrize(("parts", "problem"), [
    (("--steps 0", "", "pass --steps 1"), "no expected part"),
    (("--steps 0", "a positive integer", ""), "no fix part"),
    (("--steps 0\nand more", "a positive integer", "pass --steps 1"), "the received part spans lines"),
    (("steps | received 0", "a positive integer", "pass --steps 1"), "old '| received | expected' form"),
    (("--steps 0", "expected a positive integer", "pass --steps 1"), "starts with 'expected'"),
    (("--steps 0", "a positive integer", "expected a number"), "another expectation"),
    (("load: x; expected y; do z", "a file", "pass another"), "a '; ' inside a part"),
    (("--steps 0", "a positive integer", "pass 1; or 2"), "a '; ' inside a part"),
])
def test_the_form_check_names_what_is_wrong(parts, problem):
    problems = error_form_problems(DMMError(*parts))
    assert any(problem in text for text in problems), problems


def test_error_crosses_a_process_boundary_whole():
    error = DMMError("episode 3 of 'a.hdf5': no actions", "an actions dataset", "record actions")
    error.quiet = True
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.fix, copy.quiet) == (DMMError, str(error), error.fix, True)


def test_within_names_where_and_keeps_the_rest():
    error = DMMError("no actions", "an actions dataset", "record actions")
    error.quiet = True
    wrapped = error.within("episode 3 of 'a.hdf5'")
    assert str(wrapped) == "episode 3 of 'a.hdf5': no actions; expected an actions dataset; record actions"
    assert wrapped.quiet is True and error_form_problems(wrapped) == []


def test_dimension_check_speaks_the_grammar():
    with pytest.raises(DMMError) as caught:
        check_dims("dataset 'x'", (11, 3), (17, 6), "the checkpoint's", "pass --dataset with a hopper recording")
    assert str(caught.value) == ("dataset 'x' state/action dims 11/3; expected 17/6 (the checkpoint's); "
                                 "pass --dataset with a hopper recording")


def test_a_library_error_folds_into_one_part():
    library = OSError("Unable to open file (file signature not found; truncated?)\nmore detail")
    received = describe_error(library)
    assert received == "OSError: Unable to open file (file signature not found, truncated?)"
    assert error_form_problems(DMMError(f"'a.hdf5': {received}", "an HDF5 file", "pass another file")) == []
