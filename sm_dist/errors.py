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


class ActorStartError(UserError):
    """A Ray actor (a rollout worker's vLLM engine, a learner rank) failed in its constructor: almost
    always settings the library refused (rollout.engine.*, the model folder, the cluster)."""


class CheckpointError(UserError):
    """A checkpoint (or a run directory to resume) that cannot be used."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (newlines of wrapped library messages folded into spaces)."""
    return " ".join(str(err).split())


def filesystem_error(err: BaseException, run_dir: str | None = None) -> UserError | None:
    """The OSError behind `err` (itself, its cause, or a Ray task error's `cause`) as a UserError when the
    filesystem refused a write (full, read-only, no permission), else None."""
    import errno
    import os
    from pathlib import Path

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) and e.errno else _errno_in_text(e)
        if code in _FS_ERRNOS:
            where = (e.filename if isinstance(e, OSError) else None) or run_dir or "the filesystem"
            full = code in (errno.ENOSPC, errno.EDQUOT)
            fix = (
                f"free space on that filesystem (df -h {os.path.dirname(str(where)) or where})"
                if full
                else "make it writable (permissions, a read-write mount)"
            )
            if run_dir and any((Path(run_dir) / "checkpoints").glob("step-*")):
                fix += f", then continue: sm-dist train --resume {run_dir} (its checkpoints are intact)"
            elif run_dir:
                fix += ", then run the same command again (the run had no checkpoint yet)"
            return UserError(str(where), f"{os.strerror(code)} (errno {code}).", fix)
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


_FS_ERRNOS = {28, 122, 30, 13, 1}  # ENOSPC, EDQUOT, EROFS, EACCES, EPERM


def _errno_in_text(e: BaseException) -> int | None:
    """The errno in an error's text: a Rust I/O error ("... (os error 28)", safetensors' writer) or the
    errors `shutil.copytree` collects ("[Errno 28] No space left on device")."""
    import re

    m = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(e))
    return int(m[1] or m[2]) if m else None
