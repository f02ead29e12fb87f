"""Is `run.run_dir` one storage for every process that writes to it? Checked once at start-up.

A checkpoint is a temp folder the driver creates and renames, into which every learner rank writes its
own shard (and rank 0 the HF `model/`): on a cluster, that works only when the path is the same
filesystem on the driver's node and on every learner's node (NFS, a ReadWriteMany volume). A node-local
disk at the same path would scatter the shards over the nodes and leave the driver renaming an
incomplete folder. So each learner rank writes a fresh token under `run.run_dir`, and the driver reads
every one back; a token it cannot read names the rank, its node and the fix.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from sm_dist.config import ConfigError

log = logging.getLogger("sm_dist.driver")
CHECK_DIR = ".storage-check"


def check_shared_run_dir(ray, run_dir: str | Path, learners: list, timeout_s: float) -> None:
    """Raise a `ConfigError` naming `run.run_dir` when a learner rank's token is not readable here."""
    token = uuid.uuid4().hex
    d = Path(run_dir) / CHECK_DIR / token
    paths = [d / f"rank{r}" for r in range(len(learners))]
    here = ray.util.get_node_ip_address()
    try:
        nodes = ray.get(
            [lr.write_token.remote(str(p), token) for lr, p in zip(learners, paths)], timeout=timeout_s
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
