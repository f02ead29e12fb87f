"""Logging for sm-dist: one `sm_dist` logger tree, a console handler, a run-directory file, JSON on demand.

* Console (stderr): `--log-level` (default INFO, or `SM_DIST_LOG_LEVEL`), lines `[sm-dist] message`,
  or one JSON object a line with `--log-json` (`SM_DIST_LOG_JSON=1`): {"time", "level", "logger", "msg"}.
* `<run_dir>/driver.log`: everything the driver logs at DEBUG and above (the resolved config included),
  whatever the console level.
* `<run_dir>/workers.log`: what the Ray actors print (vLLM's engine lines, Ray's worker chatter),
  which would otherwise interleave with the progress bar. With `--log-level DEBUG` they go to the
  console as well (Ray's own printer). This goes through Ray's private dispatcher of forwarded worker
  output (`route_worker_logs` says why no public setting does it); if that internal moves, Ray's
  console printing is left as it was.

Imports no Ray, torch or vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = "sm_dist"
_CONSOLE = "sm_dist.console"  # handler names, so a second setup call replaces instead of adding
_FILE = "sm_dist.file"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO-8601 UTC), level, logger, msg (+ exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _replace(logger: logging.Logger, name: str, handler: logging.Handler) -> None:
    for h in [h for h in logger.handlers if h.get_name() == name]:
        logger.removeHandler(h)
        h.close()
    handler.set_name(name)
    logger.addHandler(handler)


def setup_logging(level: str | None = None, json_lines: bool | None = None) -> logging.Logger:
    """Configure the console handler of the `sm_dist` logger; returns it. Raises ValueError naming a bad level."""
    level = (level or os.environ.get("SM_DIST_LOG_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"--log-level {level!r}: use one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    if json_lines is None:
        json_lines = os.environ.get("SM_DIST_LOG_JSON", "") not in ("", "0", "false")
    logger = logging.getLogger(ROOT)
    logger.setLevel(logging.DEBUG)  # handlers filter; the file keeps DEBUG
    logger.propagate = False
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(level)
    h.setFormatter(JsonFormatter() if json_lines else logging.Formatter("[sm-dist] %(message)s"))
    _replace(logger, _CONSOLE, h)
    return logger


def console_level() -> int:
    """The console handler's level (INFO when logging was never set up)."""
    for h in logging.getLogger(ROOT).handlers:
        if h.get_name() == _CONSOLE:
            return h.level
    return logging.INFO


def log_to_run_dir(run_dir: Path) -> Path:
    """Add `<run_dir>/driver.log` (DEBUG, plain text with times) to the `sm_dist` logger."""
    path = Path(run_dir) / "driver.log"
    h = logging.FileHandler(path, encoding="utf-8")
    h.setLevel(logging.DEBUG)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _replace(logging.getLogger(ROOT), _FILE, h)
    return path


def route_worker_logs(run_dir: Path) -> Path | None:
    """Send what Ray's actors print to `<run_dir>/workers.log` instead of the console (module docstring).

    Call after `ray.init(log_to_driver=True)`. At console level DEBUG the console printer stays too.
    Returns the file, or None when Ray's dispatcher is not where this was written against.

    Why a private Ray module (ray 2.60, read in its source): the lines `log_to_driver` forwards go to
    one printer, `print_to_stdstream`, which writes to this process's stdout/stderr, and no public
    setting points them elsewhere. `ray.init(log_to_driver=False)` (or RAY_LOG_TO_DRIVER=0) stops the
    forwarding altogether: the lines then stay in each node's session folder (/tmp/ray/session_*/logs/
    worker-*.out), not in the run directory. `ray.init(logging_config=ray.LoggingConfig(...))` sets up
    Python `logging` (a root handler and its format) in the driver and the workers; it does not touch
    the forwarded stdout/stderr lines (vLLM's prints, C++ log lines). RAY_DEDUP_LOGS only merges
    repeated lines. The state API (`ray.util.state.get_log`) needs the dashboard, which a local run
    starts without. So the handler is swapped on `global_worker_stdstream_dispatcher`, the hook Ray's
    own client server (`ray/util/client/server/logservicer.py`) uses to receive the same lines.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    path = Path(run_dir) / "workers.log"
    f = path.open("a", encoding="utf-8", buffering=1)

    def write(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or "worker"
        for line in data.get("lines", ()):
            f.write(f"({who} pid={data.get('pid')}) {line}\n")

    if console_level() > logging.DEBUG:
        dispatcher.remove_handler("ray_print_logs")  # Ray's console printer (a no-op when absent)
    dispatcher.remove_handler("sm_dist_worker_logs")
    dispatcher.add_handler("sm_dist_worker_logs", write)
    return path
