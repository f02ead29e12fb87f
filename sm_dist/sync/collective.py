"""Weight sync by a collective broadcast from learner rank 0 to every rollout worker (DESIGN §4, §6).

`GlooSender` / `GlooReceiver` are the CPU member of the collective family: the same four-stage worker
protocol as the NCCL transport (`RolloutWorker.receive_weights(stage, info, version)` with "init" |
"start" | "update" | "finish"), the same ordering and locking, over a gloo process group instead of
vLLM's NCCL engine. So the collective path (threaded workers, a blocking send on the learner, the
engine lock held from "start" to "finish", timeouts that name the worker) runs for real on CPU machines
and in CI, and on GPU clusters `sync.transport.kind=nccl` swaps in `sm_dist.sync.nccl`.

    sender = GlooSender(timeout_s=300)
    sender.connect(workers, names)           # rendezvous at rank 0's own address: workers 1..N join
    sender.send(version, state_dict)         # start -> broadcast the safetensors buffer -> finish

The group is rank 0's own: it picks its node's address and a free port there, and hands both to the
workers at "init". The group is private (a `TCPStore` and a `ProcessGroupGloo` built directly, never the global default
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

import torch

from sm_dist.orchestrator.cluster import free_port
from sm_dist.sync.base import (
    Delivery,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    confirm_versions,
    wait_all,
)

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


class StageClient:
    """Runs one weight stage on every `RolloutWorker` (`receive_weights(stage, info, version)`) and
    waits for all of them; a timeout names the late workers. Shared by the gloo and NCCL senders."""

    def __init__(self, workers: Sequence[Any], names: Sequence[str], timeout_s: float, label: str):
        self.workers, self.names = list(workers), list(names)
        self.timeout_s, self.label = timeout_s, label
        self.version: int | None = None  # the version being sent, set by the sender each round

    def call(self, stage: str, info: Any = None, per_worker: Sequence[Any] | None = None) -> list:
        """`stage` on every worker with `info` (or `per_worker[i]` for worker i); their answers."""
        infos = per_worker if per_worker is not None else [info] * len(self.workers)
        futures = [w.receive_weights.remote(stage, i, self.version) for w, i in zip(self.workers, infos)]
        what = f"{self.label} weight transfer stage {stage!r} (version {self.version})"
        return wait_all(futures, self.names, self.timeout_s, what)


class GlooReceiver(WeightReceiver):
    """Worker side: joins the group at "init", receives the safetensors buffer and loads it at "update"."""

    pg = None

    def init(self, info: Any, version: int | None) -> None:
        self.pg, self._store = open_group(
            info["master_address"], int(info["master_port"]), int(info["rank"]), int(info["world_size"]),
            float(info["timeout_s"]),
        )  # fmt: skip

    def update(self, info: Any, version: int | None) -> None:
        if self.pg is None:
            raise RuntimeError(f"{self.worker_id}: gloo weights of version {version} before the group's init")
        buf = torch.empty(int(info["nbytes"]), dtype=torch.uint8)
        broadcast_(self.pg, buf)
        self.engine.load_weights_bytes(buf.numpy(), version)  # also drops the prefix cache


class GlooSender(WeightSender):
    """Learner rank 0: hosts the group at its own node's address and broadcasts each version."""

    def __init__(self, timeout_s: float, master_address: str | None = None, master_port: int | None = None):
        super().__init__(timeout_s)
        self.master_address, self.master_port = master_address, master_port
        self.pg = None

    def connect(self, workers: Sequence[Any], names: Sequence[str], module: Any = None, dtype=None) -> None:
        """Rendezvous with every worker (they block in "init" until rank 0 opens the store)."""
        super().connect(workers, names, module, dtype)
        self.client = StageClient(self.workers, self.names, self.timeout_s, "gloo")
        self.master_address = self.master_address or _node_ip()
        self.master_port = self.master_port or free_port(self.master_address)
        world = 1 + len(self.workers)
        base = {"master_address": self.master_address, "master_port": self.master_port, "world_size": world,
                "timeout_s": self.timeout_s}  # fmt: skip
        infos = [{**base, "rank": i + 1} for i in range(len(self.workers))]
        with ThreadPoolExecutor(max_workers=1) as exe:
            fut = exe.submit(self.client.call, "init", per_worker=infos)
            try:
                self.pg, self._store = open_group(
                    self.master_address, self.master_port, 0, world, self.timeout_s
                )
            except RuntimeError as e:
                raise WeightSyncError(
                    f"gloo weight-transfer rendezvous at {self.master_address}:{self.master_port} with "
                    f"{self.names} failed within {self.timeout_s}s: {e}"
                ) from e
            fut.result()

    def send(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> Delivery:
        from sm_dist.sync.object_store import state_dict_to_buffer
        from sm_dist.sync.stream import as_stream

        if self.pg is None:
            raise RuntimeError("GlooSender.send before connect()")
        self.client.version = version
        t0 = time.perf_counter()
        stream = as_stream(state_dict, self.dtype)
        buf = state_dict_to_buffer(stream)
        t1 = time.perf_counter()
        self.client.call("start")  # every worker holds its engine lock: between two batches
        t2 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as exe:
            fut = exe.submit(self.client.call, "update", {"nbytes": int(buf.nbytes)})
            try:
                broadcast_(self.pg, torch.from_numpy(buf))
            except RuntimeError as e:
                raise WeightSyncError(
                    f"gloo broadcast of weights version {version} ({buf.nbytes} bytes) to {self.names} failed "
                    f"or took longer than {self.timeout_s}s: {e}. The group is unusable; restart the workers"
                ) from e
            fut.result()
        confirm_versions(self.names, self.client.call("finish"), version)
        t3 = time.perf_counter()
        return Delivery(
            version,
            metrics={"sync/version": float(version), "sync/bytes": float(buf.nbytes), "sync/serialize_s": t1 - t0,
                     "sync/pause_s": t2 - t1, "sync/apply_s": t3 - t2,
                     "sync/largest_read_bytes": float(stream.largest_read_bytes)},
        )  # fmt: skip


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
