"""The weight-sync interface (DESIGN §4): per transport, a sender on learner rank 0 and a receiver in
each rollout worker, selected by `sync.transport.kind` (`sm_dist.sync.config`).

    sender = cfg.sync.transport.sender(timeout_s)       # in learner rank 0 (Learner.publish_weights(workers=...))
    sender.connect(workers, names, module)              # collectives rendezvous here
    delivery = sender.send(version, model.state_dict()) # Learner.publish_weights, every sync.every steps

    # in each worker, through RolloutWorker.receive_weights(stage, info, version):
    receiver = cfg.sync.transport.receiver(engine, worker_id, timeout_s)
    receiver.stage("update", info, version)             # + "init" / "start" / "finish" for collectives

Ordering rules: a worker applies a version between two batches, never inside one (its engine lock is
held by a batch and by a weight load), tags every rollout with the version it ran, and answers each
stage with the version it now runs. `Delivery.pending` holds the confirmations still to come (the
object store's send returns at once; a collective's send waits); a worker that does not confirm in
time raises a `WeightSyncError` naming it, the version and the timeout.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the driver's parts import this module without torch
    import torch


class WeightSyncError(TimeoutError):
    """A weight sync step did not finish in time, or a worker reported the wrong version."""


def wait_all(futures: Sequence[Any], names: Sequence[str], timeout_s: float, what: str) -> list:
    """`ray.get` of one future per worker, after waiting at most `timeout_s` for all of them; a
    `WeightSyncError` names the workers that did not answer and `what` they were doing."""
    import ray

    ready, not_ready = ray.wait(list(futures), num_returns=len(futures), timeout=timeout_s)
    if not_ready:
        late = [names[futures.index(f)] for f in not_ready]
        raise WeightSyncError(
            f"{what} timed out after {timeout_s}s: {late} did not confirm ({len(ready)}/{len(futures)} did)"
        )
    return ray.get(list(futures))


def confirm_version(name: str, got: int, version: int) -> None:
    """A worker's answer to a sync must be the version it was sent."""
    if got != version:
        raise WeightSyncError(f"{name} reports version {got} after a sync of version {version}")


def confirm_versions(names: Sequence[str], got: Sequence[int], version: int) -> None:
    """Every worker's answer to a sync must be the version it was sent."""
    for name, v in zip(names, got, strict=True):
        confirm_version(name, v, version)


@dataclass
class Delivery:
    """What one `WeightSender.send` leaves to its caller: the version sent, the workers whose
    confirmation is still to come (worker index -> a future answering the version it loaded; empty
    when the send itself waited for every worker) and `sync/...` metrics."""

    version: int
    pending: dict[int, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class WeightSender(ABC):
    """Learner rank 0's end of a transport (built by `sync.transport.sender()` in the learner actor).

    `connect` once with the rollout workers' actor handles (a collective transport rendezvouses
    here), then `send` every publish. A worker's end is a `WeightReceiver`, reached through the
    worker's single entry point `RolloutWorker.receive_weights(stage, info, version)`."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.workers: list[Any] = []
        self.names: list[str] = []
        self.dtype: torch.dtype | None = None

    def connect(
        self,
        workers: Sequence[Any],
        names: Sequence[str],
        module: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Remember the workers (`names` label them in errors); `module` is the model whose weights
        are sent (used by transports that read it directly); `dtype` the engines' (model.dtype):
        floating-point tensors travel in it (None: as they are)."""
        self.dtype = dtype
        if not workers:
            raise ValueError(f"{type(self).__name__} needs at least one rollout worker")
        self.workers = list(workers)
        self.names = list(names) or [f"worker[{i}]" for i in range(len(self.workers))]

    @abstractmethod
    def send(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> Delivery:
        """Send `state_dict` (HF checkpoint names) as `version` to every connected worker."""

    def resend(self, index: int) -> Delivery:
        """Send the last version again to worker `index` (it restarted with its initial weights)."""
        raise WeightSyncError(
            f"{type(self).__name__}: a restarted worker ({self.names[index]}) cannot rejoin this transport's "
            "group. Resume the run (--resume), or use sync.transport.kind=object_store, which survives restarts"
        )


class WeightReceiver:
    """A rollout worker's end of a transport (built by `sync.transport.receiver(...)` in the worker).

    Stages, in order, one call each: "init" (once: join the transport), then per version "start"
    (the worker holds its engine lock from here: between two batches), "update", "finish". A
    transport that needs no stages other than "update" ignores the others."""

    STAGES = ("init", "start", "update", "finish")

    def __init__(self, engine: Any, worker_id: str, timeout_s: float):
        self.engine, self.worker_id, self.timeout_s = engine, worker_id, timeout_s

    def stage(self, stage: str, info: Any, version: int | None) -> None:
        if stage not in self.STAGES:
            raise ValueError(f"{self.worker_id}: unknown weight stage {stage!r}; use {'/'.join(self.STAGES)}")
        getattr(self, stage)(info, version)

    def init(self, info: Any, version: int | None) -> None:
        """Join the transport (collectives rendezvous here)."""

    def start(self, info: Any, version: int | None) -> None:
        """A version is about to arrive."""

    def update(self, info: Any, version: int | None) -> None:
        """Receive the weights of `version` and load them into the engine (every transport has one)."""
        raise NotImplementedError

    def finish(self, info: Any, version: int | None) -> None:
        """The version is complete."""


def deliver(sender: WeightSender, version: int, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """`send`, then wait (at most the sender's timeout) until every worker confirms `version`; returns
    the metrics. For callers that want a blocking publish (tools, benchmarks); the driver instead
    tracks `Delivery.pending` beside the rollouts."""
    t0 = time.perf_counter()
    d = sender.send(version, state_dict)
    if d.pending:
        idx = list(d.pending)
        names = [sender.names[i] for i in idx]
        got = wait_all(
            [d.pending[i] for i in idx], names, sender.timeout_s, f"weight sync of version {version}"
        )
        confirm_versions(names, got, version)
    return {**d.metrics, "sync/total_s": time.perf_counter() - t0}
