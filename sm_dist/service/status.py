"""Who owns a run directory, and where a run stands (`sm-dist status RUN_DIR`), from its files alone.

A running `sm-dist train` holds an exclusive `flock` on `<run_dir>/driver.lock` for its lifetime and
records itself in `<run_dir>/driver.json` (pid, host, start time): of two drivers started on one run
directory at once, exactly one gets the lock (two would interleave checkpoints, buffer segments and
metrics); the other is refused with the holder's pid. The kernel drops the lock when its process dies
(kill -9 included), so a driver.json left by a killed driver is stale and taken over. driver.json is
checked too, for a driver on another host where the filesystem does not share locks between nodes.
`run_status` reads driver.json, config.yaml, metrics.jsonl, checkpoints/, the buffer's manifests,
summary.json and api.json (the control API's address, sm_dist/service/api.py); it imports no torch or Ray,
so it works on a login node while the job runs elsewhere.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from sm_dist.errors import UserError

log = logging.getLogger("sm_dist.driver")
DRIVER_FILE = "driver.json"
LOCK_FILE = "driver.lock"  # flock'd by the live driver; never deleted (a waiter may hold its inode)
_held: dict[str, int] = {}  # run dir (resolved) -> the fd whose flock this process holds
_FIX_CONFIG = (
    "it is the resolved config the run wrote at its start: restore it (sm-dist config CONFIG [overrides] "
    "> {d}/config.yaml prints one), or copy the newest config.before-step-*.yaml over it"
)


def _read_json(path: Path) -> dict | None:
    """A JSON object file written by the run, or None when absent; a corrupt one is a UserError."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(str(path), f"is not valid JSON ({e}).", "restore or delete the file") from None


class RunDirBusy(RuntimeError):
    """Another live driver holds the run directory."""


def _alive(info: dict) -> bool | None:
    """Is the driver in `info` alive? None when it runs on another host (cannot tell from here)."""
    if info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_driver(run_dir: str | Path) -> dict | None:
    p = Path(run_dir) / DRIVER_FILE
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):  # no driver there
        return None


def claim_run_dir(run_dir: str | Path) -> None:
    """Take the run directory's lock and record this process as its driver; raise RunDirBusy if a live
    driver holds it. A driver found dead (kill -9) on this host may have left its local Ray behind:
    those processes are stopped (`reap_leftovers`)."""
    key = str(Path(run_dir).resolve())
    fresh = key not in _held  # a second claim by the same driver (a retry) keeps its lock
    if fresh:
        fd = _lock(Path(run_dir) / LOCK_FILE, create=True)
        if fd is None:
            raise RunDirBusy(_busy(run_dir, _holder(run_dir), locked=True))
        _held[key] = fd
    try:
        check_free(run_dir)  # a driver on another host, where the lock may not reach
        info = read_driver(run_dir)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": dt.datetime.now(dt.UTC).isoformat(),
        }
        _write_driver(run_dir, me)
    except BaseException:
        if fresh:
            _unlock(key)
        raise
    if info is not None and info.get("pid") != os.getpid():
        reap_leftovers(info)


def _lock(path: Path, create: bool) -> int | None:
    """An fd holding an exclusive flock on `path`; None when another process holds it. A filesystem
    without locks (ENOLCK, EOPNOTSUPP) leaves driver.json as the only guard, with a warning."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            log.warning(f"{path}: this filesystem takes no lock ({e.strerror}); driver.json alone guards it")
            return fd
        os.close(fd)
        return None
    return fd


def _unlock(key: str) -> None:
    fd = _held.pop(key, None)
    if fd is not None:
        os.close(fd)  # closing the last fd of the open file drops its flock


def _holder(run_dir: str | Path, wait_s: float = 2.0) -> dict:
    """The driver.json of the lock's holder: it writes the file just after taking the lock, so a
    missing or stale one is read again for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        info = read_driver(run_dir)
        if info is not None and info.get("pid") != os.getpid() and _alive(info) is not False:
            return info
        if time.monotonic() > deadline:
            return {"pid": "unknown (no driver.json yet)", "host": socket.gethostname(), "started": "-"}
        time.sleep(0.02)


def _write_driver(run_dir: str | Path, info: dict) -> None:
    tmp = Path(run_dir) / (DRIVER_FILE + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, Path(run_dir) / DRIVER_FILE)


def note_children(run_dir: str | Path) -> None:
    """Record this driver's descendant processes (the local Ray it started: GCS, raylet, agents, actor
    workers) with their start times in driver.json, so that the next driver can stop them if this one
    is killed without a chance to shut Ray down. Call after Ray and the actors are up."""
    import psutil

    info = read_driver(run_dir)
    if info is None or info.get("pid") != os.getpid():
        return
    kids = psutil.Process().children(recursive=True)
    info["children"] = [[p.pid, p.create_time()] for p in kids]
    _write_driver(run_dir, info)


def reap_leftovers(info: dict) -> list[int]:
    """Stop the processes a dead driver on this host recorded (`note_children`) that still run: the
    same pid AND the same start time (a reused pid is left alone). Returns the pids stopped."""
    import psutil

    if info.get("host") != socket.gethostname() or _alive(info) is not False:
        return []
    gone = []
    for pid, started in info.get("children", []):
        try:
            p = psutil.Process(int(pid))
            if abs(p.create_time() - float(started)) < 1e-3:
                p.kill()
                gone.append(int(pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if gone:
        log.warning(f"stopped {len(gone)} processes left by the dead driver pid {info.get('pid')}: {gone}")
    return gone


def check_free(run_dir: str | Path) -> None:
    """Raise RunDirBusy if another live driver holds `run_dir`'s lock, or a live driver on another host
    is recorded in its driver.json (a stale driver.json does not count). Takes nothing."""
    key = str(Path(run_dir).resolve())
    lock = Path(run_dir) / LOCK_FILE
    if key not in _held and lock.is_file():  # never opened twice here: on NFS a close drops the lock
        fd = _lock(lock, create=False)
        if fd is None:
            raise RunDirBusy(_busy(run_dir, _holder(run_dir), locked=True))
        os.close(fd)
    info = read_driver(run_dir)
    if info is not None and info.get("pid") != os.getpid() and _alive(info) is not False:
        raise RunDirBusy(_busy(run_dir, info, locked=False))


def _busy(run_dir: str | Path, info: dict, locked: bool) -> str:
    where = f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}"
    gone = "" if locked else f" If that driver is gone, delete {Path(run_dir) / DRIVER_FILE}."
    return (
        f"{run_dir} is in use by another sm-dist train ({where}). Stop it first (SIGTERM ends it with a "
        f"checkpoint), or use another run.run_dir.{gone}"
    )


def release_run_dir(run_dir: str | Path) -> None:
    """Remove this driver's driver.json and drop its lock (the lock file stays)."""
    info = read_driver(run_dir)
    if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        (Path(run_dir) / DRIVER_FILE).unlink(missing_ok=True)
    _unlock(str(Path(run_dir).resolve()))


def _read_run_config(d: Path) -> dict:
    """The resolved config of the latest (re)start (config.yaml), as a dict."""
    import yaml

    latest = d / "config.yaml"
    if not latest.exists():
        what = "is not a run directory (no config.yaml)" if d.is_dir() else "does not exist"
        raise UserError(str(d), f"{what}.", "pass the run.run_dir of a run started by sm-dist train")
    try:
        cfg = yaml.safe_load(latest.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(
            str(latest), f"is not valid YAML ({type(e).__name__}).", _FIX_CONFIG.format(d=d)
        ) from None
    if not isinstance(cfg, dict):
        raise UserError(str(latest), f"holds a {type(cfg).__name__}, not a config.", _FIX_CONFIG.format(d=d))
    return cfg


def run_status(run_dir: str | Path, window: int = 10) -> dict:
    """Where the run in `run_dir` stands (see the module docstring for the files read)."""

    from sm_dist.learner.checkpoint import list_checkpoints
    from sm_dist.service.metrics import read_metrics

    d = Path(run_dir)
    cfg = _read_run_config(d)
    try:
        rows = read_metrics(d)
    except (FileNotFoundError, ValueError):
        rows = []
    summary = _read_json(d / "summary.json")
    driver = read_driver(d)
    state = _state(driver, summary)
    last = rows[-1] if rows else {}
    recent = rows[-window:]

    def mean(key: str) -> float | None:
        vals = [r[key] for r in recent if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    version = next((r["sync/version"] for r in reversed(rows) if r.get("sync/version") is not None), None)
    buf = _buffer_counts(d)
    ckpts = list_checkpoints(d)
    return {
        "run_dir": str(d),
        "state": state,
        "driver": driver,
        "step": last.get("step"),
        "total_steps": cfg.get("run", {}).get("total_steps"),
        "steps_per_s": _steps_per_s(rows[-50:]),
        "weights_version": version,
        "loss_total": mean("loss/total"),
        "loss_bc": mean("loss/bc"),
        "learner_restarts": last.get("run/learner_restarts"),
        "checkpoints": [p.name for p in ckpts],
        "corrupt_checkpoints": sorted(p.name for p in (d / "checkpoints").glob("step-*.corrupt*")),
        "last_checkpoint": str(ckpts[-1]) if ckpts else None,
        "buffer_added_rows": buf.get("added_rows"),
        "buffer_evicted_rows": buf.get("evicted_rows"),
        "buffer_shards": buf.get("shards"),
        "summary": summary,
        "api": _read_json(d / "api.json") if state.startswith("running") else None,  # sm_dist/service/api.py
    }


def _state(driver: dict | None, summary: dict | None) -> str:
    alive = _alive(driver) if driver else False
    if driver and alive is not False:
        return "running" if alive else "running on another host (not checked from here)"
    if driver:
        return "died"  # driver.json left behind: killed without its clean exit
    if summary:
        return "stopped early" if summary.get("stopped_early") else "finished"
    return "not started"


def _steps_per_s(span: list[dict]) -> float | None:
    if len(span) > 1 and span[-1]["time"] > span[0]["time"]:
        return (span[-1]["step"] - span[0]["step"]) / (span[-1]["time"] - span[0]["time"])
    return None


def _buffer_counts(d: Path) -> dict:
    """Rows added and evicted, over every replay-buffer shard's manifest ({} when there is none yet)."""
    from sm_dist.buffer.shards import manifest_paths

    paths = manifest_paths(d)  # one listing: the count and the sums see the same shards
    docs = [doc for p in paths.values() if (doc := _read_json(p)) is not None]
    if not docs:
        return {}
    out = {k: sum(doc.get(k, 0) for doc in docs) for k in ("added_rows", "evicted_rows")}
    return {**out, "shards": len(paths)}


def _driver_note(drv: dict, state: str) -> str:
    if state == "died":  # a driver killed without its clean exit leaves driver.json behind
        return (f" (stale {DRIVER_FILE}: pid {drv.get('pid')} on {drv.get('host')}, started {drv.get('started')}, "
                "no longer runs; the next sm-dist train on this run directory takes it over)")  # fmt: skip
    return f" (pid {drv.get('pid')} on {drv.get('host')}, since {drv.get('started')})"


def format_status(st: dict) -> str:
    def num(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    total = "until stopped" if st["total_steps"] is None else st["total_steps"]
    drv = st["driver"]
    lines = [
        f"run dir:     {st['run_dir']}",
        f"state:       {st['state']}" + (_driver_note(drv, st["state"]) if drv else ""),
        f"step:        {num(st['step'], '{}')} of {total}   ({num(st['steps_per_s'], '{:.2f}')} steps/s recently)",
        f"loss:        total {num(st['loss_total'])}, bc {num(st['loss_bc'])} (mean of the last metric lines)",
        f"weights:     version {num(st['weights_version'], '{:.0f}')}"
        + (f", learner restarts {st['learner_restarts']:.0f}" if st["learner_restarts"] else ""),
        f"checkpoint:  {st['last_checkpoint'] or '-'}"
        + (f"  ({len(st['checkpoints'])} kept)" if st["checkpoints"] else ""),
        f"buffer:      {num(st['buffer_added_rows'], '{}')} rows added, {num(st['buffer_evicted_rows'], '{}')} evicted"
        + (f" ({st['buffer_shards']} shards)" if (st.get("buffer_shards") or 1) > 1 else ""),
    ]
    if st.get("api"):
        lines.append(
            f"control:     {st['api'].get('url')}   (sm-dist ctl {st['run_dir']} status|scale N|pause|...)"
        )
    if st.get("corrupt_checkpoints"):
        lines.append(
            f"set aside:   {', '.join(st['corrupt_checkpoints'])} (corrupt, found on a resume; kept)"
        )
    if st["state"] == "died":
        lines.append(
            f"resume with: sm-dist train --resume {st['run_dir']}   (the driver exited without "
            "cleaning up: killed, or its machine went away)"
        )
    return "\n".join(lines)
