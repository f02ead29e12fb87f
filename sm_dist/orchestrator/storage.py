"""Is `run.run_dir` one storage for every process that writes to it? Checked once at start-up.

A checkpoint is a temp folder the driver creates and renames, into which every learner rank writes its
own shard (and rank 0 the HF `model/`): on a cluster, that works only when the path is the same
filesystem on the driver's node and on every learner's node (NFS, a ReadWriteMany volume). A node-local
disk at the same path would scatter the shards over the nodes and leave the driver renaming an
incomplete folder. So each learner rank writes a fresh token under `run.run_dir`, and the driver reads
every one back; a token it cannot read names the rank, its node and the fix.

Also what a run directory already holds: a run a fresh start must not overwrite, the config history and
metric rows a resume sets aside, and the replay buffer's shard count a resume must keep.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path

from sm_dist.config import ConfigError

log = logging.getLogger("sm_dist.driver")
CHECK_DIR = ".storage-check"


def check_shared_run_dir(ray, run_dir: str | Path, learners: list, timeout_s: float) -> None:
    """Raise a `ConfigError` naming `run.run_dir` when a learner rank's token is not readable here."""
    from sm_dist.learner.calls import write_token

    token = uuid.uuid4().hex
    d = Path(run_dir) / CHECK_DIR / token
    paths = [d / f"rank{r}" for r in range(len(learners))]
    here = ray.util.get_node_ip_address()
    try:
        nodes = ray.get(
            [lr.__ray_call__.remote(write_token, str(p), token) for lr, p in zip(learners, paths)],
            timeout=timeout_s,
        )
        unseen = [r for r, p in enumerate(paths) if not (p.is_file() and p.read_text() == token)]
    except ray.exceptions.RayTaskError as e:  # a rank could not even write there
        cause = getattr(e, "cause", None) or e
        raise _not_one_storage(
            run_dir, f"a learner rank could not write under it ({str(cause)[:300]})"
        ) from None
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if unseen:
        r = unseen[0]
        raise _not_one_storage(
            run_dir,
            f"learner rank {r} on node {nodes[r]} wrote {paths[r]}, but the driver on node {here} cannot read it",
        )
    log.info(
        f"run.run_dir {run_dir}: the same storage for the driver ({here}) and learner nodes {sorted(set(nodes))}"
    )


def _not_one_storage(run_dir: str | Path, what: str) -> ConfigError:
    return ConfigError(
        "run.run_dir",
        f"{run_dir} is not one storage for every node: {what}. Checkpoints (each rank writes its own shard "
        "into a folder the driver renames) would be scattered over the nodes' own disks.",
        "set run.run_dir to a folder every node mounts at the same path (NFS, a ReadWriteMany volume: "
        "deploy/ mounts one at /shared), e.g. run.run_dir=/shared/runs/NAME",
    )


def _holds_run(run_dir: Path) -> str:
    """What of a run `run_dir` holds worth keeping ('' when nothing: absent, empty, or only the config and
    logs of a start that failed before its first step)."""
    held = []
    ckpts = sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
    if ckpts:
        held.append(f"{len(ckpts)} checkpoint(s), the last {ckpts[-1].name}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        with metrics.open("rb") as f:
            rows = sum(1 for _ in f)
        held.append(f"{rows} metric rows")
    if (run_dir / "buffer").is_dir() and any((run_dir / "buffer").iterdir()):
        held.append("a replay buffer")
    return ", ".join(held)


def check_buffer_shards(run_dir: Path, shards: int) -> None:
    """On a resume: the replay buffer must be read with the shard count it was written with. Each
    worker's rows sit in the shard its id hashed to under that count (sm_dist/buffer/shards.py), and
    re-hashing them would break each worker's FIFO, so another `buffer.shards` is refused."""
    from sm_dist.buffer.shards import buffer_dir, saved_shards

    saved = saved_shards(run_dir)
    if saved is not None and saved != shards:
        raise ConfigError(
            "buffer.shards",
            f"the run's replay buffer ({buffer_dir(run_dir)}) was written with buffer.shards={saved}; this "
            f"resume asks for buffer.shards={shards}, and its rows cannot move between shards.",
            f"resume with buffer.shards={saved} (or drop the override), or start a new run (another run.run_dir)",
        )


def claim_fresh_run_dir(run_dir: Path, overwrite: bool) -> Path | None:
    """A fresh run (no --resume) may not reuse a run directory that holds a run: refused with the fixes,
    nothing touched; with `run.overwrite=true` the old run is moved aside (returned), never deleted."""
    held = _holds_run(run_dir)
    if not held:
        return None
    if not overwrite:
        raise ConfigError(
            "run.run_dir",
            f"{run_dir} already holds a run ({held}); a fresh run there would prune its checkpoints and mix "
            "its metrics.",
            f"continue it with `sm-dist train --resume {run_dir}`, start a new run with another "
            f"run.run_dir, or add run.overwrite=true to move the old run aside to {run_dir}.old-<time>",
        )
    from sm_dist.service.status import RunDirBusy, check_free

    try:
        check_free(run_dir)
    except RunDirBusy as e:
        raise ConfigError("run.run_dir", str(e)) from None
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    try:
        run_dir.rename(aside)
    except OSError as e:
        raise ConfigError(
            "run.overwrite", f"cannot move {run_dir} aside to {aside} ({e.strerror}).",
            "free the folder (permissions, another process), or use another run.run_dir",
        ) from None  # fmt: skip
    log.warning(f"run.overwrite=true: the run that was in {run_dir} ({held}) is now {aside}")
    return aside


def keep_config_history(run_dir: Path, text: str, step: int) -> Path | None:
    """On a resume: the saved config.yaml, if `text` changes it, is kept beside it as
    `config.before-step-<step>[-n].yaml` (returned) before `text` replaces it."""
    cur = run_dir / "config.yaml"
    if not cur.is_file() or cur.read_text() == text:
        return None
    prev = run_dir / f"config.before-step-{step}.yaml"
    n = 1
    while prev.exists():
        n += 1
        prev = run_dir / f"config.before-step-{step}-{n}.yaml"
    cur.rename(prev)
    return prev


def set_aside_history(run_dir: Path, step: int) -> int:
    """On a resume from step `step`: the metric rows past it (from the attempt that went on after that
    checkpoint, and is now redone) move to metrics.abandoned.jsonl, so the history has no step twice.
    Returns how many moved."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8")
    keep, drop = [], []
    for line in text.splitlines(keepends=True):
        try:
            past = json.loads(line).get("step", 0) > step
        except (json.JSONDecodeError, AttributeError):
            past = not line.endswith("\n")  # the truncated last line of a killed run goes too
        (drop if past else keep).append(line)
    if drop:
        with (run_dir / "metrics.abandoned.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(x if x.endswith("\n") else x + "\n" for x in drop)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        tmp.replace(path)
    return len(drop)
