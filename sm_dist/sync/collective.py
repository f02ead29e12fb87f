"""Weight sync by a collective broadcast from learner rank 0 to every rollout worker (DESIGN §4, §6).

`GlooTransport` is the CPU member of the collective family: the same four-stage worker protocol as the
NCCL transport (`RolloutWorker.weight_transfer(stage, info, version)` with "init" | "start" | "update"
| "finish"), the same ordering and locking, over a gloo process group instead of vLLM's NCCL engine.
So the driver's collective path (threaded workers, a blocking publish on the learner, the engine lock
held from "start" to "finish", timeouts that name the worker) runs for real on CPU machines and in CI,
and on GPU clusters `sync.transport=nccl` swaps in `sm_dist.sync.nccl.NcclTransport`.

    transport = GlooTransport(workers, worker_names=names, timeout_s=300)
    transport.connect()                      # rendezvous: learner rank 0, workers 1..N (own TCPStore)
    transport.publish(version, state_dict)   # start -> broadcast the safetensors buffer -> finish

The group is private (a `TCPStore` and a `ProcessGroupGloo` built directly, never the global default
group), so it lives beside the learners' own torch.distributed group and vLLM's. What travels is the
same safetensors-layout buffer as the object-store transport, so a worker loads it with the same code.
A timed-out collective cannot be cancelled: after a `WeightSyncError` restart the rollout workers.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sm_dist.cluster import free_port
from sm_dist.sync.base import WeightSyncError, WeightTransport, confirm_versions, wait_all

_PREFIX = "sm_dist/weights"


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A private gloo group: rank 0 hosts the TCPStore, the others connect to it (retrying until
    `timeout_s`)."""
    timeout = dt.timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(address, port, world_size, rank == 0, timeout=timeout)
    pg = torch.distributed.ProcessGroupGloo(
        torch.distributed.PrefixStore(_PREFIX, store), rank, world_size, timeout
    )
    return pg, store


def broadcast_(pg, tensor: torch.Tensor) -> None:
    """In-place broadcast from group rank 0 (the group's own rank numbering, not the global one)."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([tensor], opts).wait()


class GlooReceiver:
    """Worker side: joins the group at "init", receives one buffer per "update"."""

    def __init__(self, info: dict[str, Any]):
        self.rank, self.world_size = int(info["rank"]), int(info["world_size"])
        self.pg, self._store = open_group(
            info["master_address"],
            int(info["master_port"]),
            self.rank,
            self.world_size,
            float(info["timeout_s"]),
        )

    def receive(self, nbytes: int) -> np.ndarray:
        buf = torch.empty(int(nbytes), dtype=torch.uint8)
        broadcast_(self.pg, buf)
        return buf.numpy()


class GlooTransport(WeightTransport):
    """Learner side (rank 0): broadcasts the weights to `workers` (RolloutWorker actor handles)."""

    def __init__(
        self,
        workers: Sequence[Any],
        worker_names: Sequence[str] = (),
        timeout_s: float = 300.0,
        master_address: str | None = None,
        master_port: int | None = None,
    ):
        if not workers:
            raise ValueError("GlooTransport needs at least one rollout worker")
        self.workers = list(workers)
        self.names = list(worker_names) or [f"worker[{i}]" for i in range(len(self.workers))]
        self.timeout_s = timeout_s
        self.master_address = master_address or _node_ip()
        self.master_port = master_port or free_port(self.master_address)
        self.world_size = 1 + len(self.workers)
        self.version: int | None = None
        self.pg = None

    def _all(self, stage: str, infos: Sequence[Any]) -> list:
        futures = [
            w.weight_transfer.remote(stage, info, self.version) for w, info in zip(self.workers, infos)
        ]
        return wait_all(
            futures,
            self.names,
            self.timeout_s,
            f"gloo weight transfer stage {stage!r} (version {self.version})",
        )

    def connect(self) -> None:
        """Rendezvous with every worker (they block in "init" until rank 0 opens the store)."""
        base = {
            "backend": "gloo",
            "master_address": self.master_address,
            "master_port": self.master_port,
            "world_size": self.world_size,
            "timeout_s": self.timeout_s,
        }
        infos = [{**base, "rank": i + 1} for i in range(len(self.workers))]
        with ThreadPoolExecutor(max_workers=1) as exe:
            fut = exe.submit(self._all, "init", infos)
            try:
                self.pg, self._store = open_group(
                    self.master_address, self.master_port, 0, self.world_size, self.timeout_s
                )
            except RuntimeError as e:
                raise WeightSyncError(
                    f"gloo weight-transfer rendezvous at {self.master_address}:{self.master_port} with "
                    f"{self.names} failed within {self.timeout_s}s: {e}"
                ) from e
            fut.result()

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        from sm_dist.sync.object_store import state_dict_to_buffer

        if self.pg is None:
            raise RuntimeError("GlooTransport.publish before connect()")
        self.version = version
        t0 = time.perf_counter()
        buf = state_dict_to_buffer(state_dict)
        t1 = time.perf_counter()
        n = len(self.workers)
        self._all("start", [None] * n)  # every worker holds its engine lock: between two batches
        t2 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as exe:
            fut = exe.submit(self._all, "update", [{"nbytes": int(buf.nbytes)}] * n)
            try:
                broadcast_(self.pg, torch.from_numpy(buf))
            except RuntimeError as e:
                raise WeightSyncError(
                    f"gloo broadcast of weights version {version} ({buf.nbytes} bytes) to {self.names} failed "
                    f"or took longer than {self.timeout_s}s: {e}. The group is unusable; restart the workers"
                ) from e
            fut.result()
        got = self._all("finish", [None] * n)
        confirm_versions(self.names, got, version)
        t3 = time.perf_counter()
        return {
            "sync/version": float(version),
            "sync/bytes": float(buf.nbytes),
            "sync/serialize_s": t1 - t0,
            "sync/pause_s": t2 - t1,
            "sync/apply_s": t3 - t2,
            "sync/total_s": t3 - t0,
        }

    def receive(self, engine: Any, payload: Any, version: int, worker_id: str) -> int:
        raise NotImplementedError(
            f"{worker_id}: gloo weights are received by RolloutWorker.weight_transfer, not WeightTransport.receive"
        )


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
