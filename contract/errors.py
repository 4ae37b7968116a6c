"""The one exception type of the project.

Every error a user can cause (bad option, missing file, wrong shape, no network)
is raised as :class:`DMMError` with a message that says what was received, what was
expected and what to do. The CLI prints the message on one line and exits non-zero;
anything else escaping is a bug and keeps its traceback.
"""


class DMMError(Exception):
    """A user-facing error: bad input, missing artifact, unmet requirement."""


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message``: a library's error, folded into one line of a DMMError."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def require(condition: bool, message: str) -> None:
    """Raise :class:`DMMError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DMMError(message)
