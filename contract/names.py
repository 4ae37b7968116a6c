"""Export names: the one check of a NAME that becomes file names, a C identifier and text in generated code.

``export --out NAME`` writes NAME.onnx / NAME.c, NAME.h, NAME.json and NAME_data_loader.py, and the
C API's symbol prefix is derived from NAME. Directories in NAME (``out/hopper``) are the user's
business; the final component is held to letters, digits, ``.``, ``_`` and ``-``, not starting
with ``-`` (a compiler or shell would read an option) or ``.`` (a hidden file), so that it can
never close a string or comment of a generated file nor turn into a command-line option.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from contract.errors import DMMError

NAME_MAX_CHARS = 100
_ALLOWED = re.compile(r"[A-Za-z0-9._-]")


def export_name_problem(stem: str) -> str | None:
    """What is wrong with ``stem`` as the final component of an export NAME, or None when it is fine."""
    if not stem:
        return "is empty"
    bad = "".join(dict.fromkeys(char for char in stem if not _ALLOWED.fullmatch(char)))
    if bad:
        return f"contains {bad!r}"
    if stem[0] in "-.":
        return f"starts with {stem[0]!r}"
    if len(stem) > NAME_MAX_CHARS:
        return f"has {len(stem)} characters"
    return None


def check_export_name(out: str | os.PathLike, suffix: str = "") -> str:
    """The stem of ``out``'s final component (``suffix`` removed when present); one DMMError if it is not a safe NAME.

    out: NAME, a path ending in NAME, or NAME + ``suffix`` (``hopper.onnx`` with suffix ``.onnx``).
    """
    name = Path(out).name
    stem = name[:-len(suffix)] if suffix and name.endswith(suffix) and name != suffix else name
    problem = export_name_problem(stem)
    if problem is not None:
        raise DMMError(f"export name {str(out)!r}: its file name {stem!r} {problem}",
                       f"1 to {NAME_MAX_CHARS} letters, digits, '.', '_' or '-', not starting with '-' or '.' "
                       "(it names the files and the C API of the export)", "choose another --out, e.g. hopper-v2")
    return stem
