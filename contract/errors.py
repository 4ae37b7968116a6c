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


def check_dims(what: str, received: tuple[int, int], expected: tuple[int, int], source: str, fix: str) -> None:
    """The one state/action size check: raise unless ``what``'s (state_dim, act_dim) are ``source``'s."""
    if (int(received[0]), int(received[1])) != (int(expected[0]), int(expected[1])):
        raise DMMError(f"{what} state/action dims | received {received[0]}/{received[1]} | expected "
                       f"{expected[0]}/{expected[1]} ({source}); {fix}")
