"""The one exception type of the project, and its one message grammar.

Every error a user can cause (bad option, missing file, wrong shape, no network) is raised
as :class:`DMMError` from three parts, and reads as one line::

    <what was received>; expected <what was expected>; <what to do>

for example ``--steps 0; expected a positive integer; pass --steps 1 or more``. The CLI
prints the line and exits non-zero; anything else escaping is a bug and keeps its
traceback. The test suite checks the form of every DMMError its tests raise
(tests/conftest.py).
"""

from __future__ import annotations


class DMMError(Exception):
    """A user-facing error: what was received, what was expected, what to do.

    ``received`` names the input and the value or state found (``--steps 0``, ``'runs/a.pt':
    no such file``); ``expected`` is what would have been accepted, without the word
    "expected"; ``fix`` is the one thing to do next.
    """

    def __init__(self, received: str, expected: str, fix: str):
        self.received, self.expected, self.fix = (str(part).strip() for part in (received, expected, fix))
        super().__init__(f"{self.received}; expected {self.expected}; {self.fix}")

    def __reduce__(self):
        # Rebuilt from its parts when it crosses a process boundary (a collect worker's error).
        return (type(self), (self.received, self.expected, self.fix), self.__dict__)

    def within(self, context: str) -> DMMError:
        """The same error with where it happened in front of what was received (``episode 3: ...``)."""
        wrapped = DMMError(f"{context}: {self.received}", self.expected, self.fix)
        wrapped.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("received", "expected", "fix")})
        return wrapped


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message``: a library's error, folded into the received part of a DMMError
    (its own '; ' become ', ': the line's two are the grammar's)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].replace('; ', ', ')}" if text else type(error).__name__


def error_parts(error: BaseException, expected: str, fix: str) -> tuple[str, str, str]:
    """(received, expected, fix) of any error, to send across a process boundary as plain data: a DMMError's
    own parts, else the library's error folded into the received part with the caller's expectation and fix."""
    if isinstance(error, DMMError):
        return error.received, error.expected, error.fix
    return describe_error(error), expected, fix


def check_dims(what: str, received: tuple[int, int], expected: tuple[int, int], source: str, fix: str) -> None:
    """The one state/action size check: raise unless ``what``'s (state_dim, act_dim) are ``source``'s."""
    if (int(received[0]), int(received[1])) != (int(expected[0]), int(expected[1])):
        raise DMMError(f"{what} state/action dims {received[0]}/{received[1]}",
                       f"{expected[0]}/{expected[1]} ({source})", fix)
