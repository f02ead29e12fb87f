"""What runs in a learner rank's process besides its role methods, through Ray's
`handle.__ray_call__.remote(fn, *args)`, which calls `fn(learner, *args)` there (on a plain `Learner`,
`fn(learner, *args)`): where the process group meets, the run-dir storage check, cheap probes.
Imports nothing heavy, so the driver can name these functions without torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sm_dist.learner.learner import Learner


def rendezvous_address(learner: Learner, port: int | None = None) -> tuple[str, int]:
    """Where the ranks' process group meets (run on rank 0): this node's address (the one Ray knows it
    by) and a port rank 0 already listens on: the group's TCPStore is opened here, on `port`
    (learner.master_port) or on one the OS picks, and kept for `Learner.join`. Choosing a free port and
    binding it later would race with anything on the node that takes a port meanwhile (rank 0's bind
    then fails and the other ranks wait for it until their timeout)."""
    from sm_dist.orchestrator.cluster import node_ip_address

    addr = node_ip_address()
    if learner.world_size == 1:  # no group, nothing to listen on
        return addr, port or 0
    return addr, learner._host_store(addr, port or 0)


def write_token(_: object, path: str, token: str) -> str:
    """Write `token` to `path` (fsynced; folders made) and return this node's address: the driver reads
    it back to check that `run.run_dir` is one storage for every node (`sm_dist.orchestrator.storage`)."""
    from sm_dist.orchestrator.cluster import node_ip_address

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        f.write(token)
        f.flush()
        os.fsync(f.fileno())
    return node_ip_address()


def step(learner: Learner) -> int:
    """`train_step` calls completed (also a cheap probe: a dead rank's call fails)."""
    return learner.c.step


def local_param_numel(learner: Learner) -> int:
    """Parameter elements this rank holds (its shard under FSDP2, everything under DDP)."""
    return sum(getattr(p, "_local_tensor", p).numel() for p in learner.module.parameters())
