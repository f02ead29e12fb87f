"""Keep vLLM's chatter off the console: `sm-dist eval`'s stdout is its result and nothing else.

vLLM, torch and the tokenizers print from Python loggers, from C++ and from subprocesses, all of which
write to file descriptors 1 and 2 whatever `sys.stdout` is. So `to_log_file` redirects the descriptors
themselves (`os.dup2`) to the log file for the duration, and restores them after; Python's own
`sys.stdout` / `sys.stderr` write through those descriptors and follow. What the command prints after
the block (the table, or the JSON with `--json`) goes to the real stdout.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def log_path(log: str | None, out: str | None) -> Path:
    """Where the log goes: `log` if given, else beside `out` (`result.json` -> `result.log`), else a
    temporary file (kept: its name is said on stderr)."""
    if log:
        return Path(log)
    if out:
        return Path(out).with_suffix(".log")
    fd, name = tempfile.mkstemp(prefix="sm-dist-eval-", suffix=".log")
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def to_log_file(path: Path) -> Iterator[None]:
    """Descriptors 1 and 2 (and with them sys.stdout / sys.stderr) write to `path` inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
