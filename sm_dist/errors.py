"""Errors a user can cause and fix (a bad file, folder, value or checkpoint), as opposed to our bugs.

`sm-dist` prints a `UserError` as one line on stderr, `sm-dist <command>: <input>: <problem> Fix: <fix>`,
and exits with code 2; `--debug` (or `SM_DIST_DEBUG=1`) shows the traceback instead. Any other exception
is a bug and keeps its traceback. Imports nothing heavy (no torch, Ray or vLLM).
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with something the user passed: `what` names the input (a path, a flag, a config key),
    `problem` says what is wrong with it, `fix` what to do."""

    def __init__(self, what: str, problem: str, fix: str = ""):
        self.what, self.problem, self.fix = what, problem, fix
        super().__init__(f"{what}: {problem}" + (f" Fix: {fix}" if fix else ""))


class DataError(UserError):
    """A data file that cannot be read, or a row that cannot be used (with `on_bad=error`)."""


class ModelError(UserError):
    """A model folder that cannot be used: no config or tokenizer, no `<bkspc>`, unreadable weights."""


class CheckpointError(UserError):
    """A checkpoint (or a run directory to resume) that cannot be used."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (newlines of wrapped library messages folded into spaces)."""
    return " ".join(str(err).split())
