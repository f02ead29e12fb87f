"""One owner of the weights on their way to the rollout workers: the publish every `sync.every`
steps, the confirmations in flight, the re-sends to joined or restarted workers, and the deadline.

    sync = WeightSync(ray, group, calls, workers, policy, state, every, feeder=rollouts)
    for step in ...:
        metrics.update(sync.maybe_publish(step))   # every sync.every steps: version + 1, rank 0 sends
        sync.check_deadline()                      # a version not applied within sync.timeout_s raises
    sync.give(i)                                   # worker i joined or restarted: the latest version
    sync.drop(); ...; sync.publish()               # the learners restarted: their weights, a new version

Ordering rules:
1. Versions only grow: `publish` tags the learners' weights with `state.version + 1`; a learner restart
   drops the confirmations in flight (their sender is gone) and publishes the restored weights under
   a new version, so the workers never keep the lost steps' weights under a version the run counts.
2. A worker that joins or restarts generates only once it holds the latest version: its first batch
   goes out on the confirmation (`feeder.submit`), never before (the weights come from learner rank 0,
   the batch from the driver, and Ray orders calls per caller only).
3. An object-store send returns at once and each worker's confirmation is tracked here; a collective
   send (gloo, nccl) returns once every worker has the version, and counts as applied by all.
4. A confirmation not in within `sync.timeout_s` of its send raises `WeightSyncError` naming the
   worker and the version.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from sm_dist.orchestrator.calls import Call, Inflight, RolloutPolicy, SyncCall, WorkerSet, answer_or_death
from sm_dist.sync.base import Delivery, WeightSyncError, confirm_version


class Feeder(Protocol):
    """The rollout side, as the weights need it (`sm_dist.orchestrator.rollouts.Rollouts`)."""

    @property
    def feeding(self) -> bool: ...

    def submit(self, i: int) -> None: ...

    def worker_died(self, call: Call, err: Exception) -> None: ...


class Publisher(Protocol):
    """The learners, as the weights need them (`sm_dist.orchestrator.learners.LearnerGroup`)."""

    def publish(self, version: int) -> Delivery: ...

    def resend(self, index: int) -> Delivery: ...

    def connect(self, workers: list, names: list[str]) -> None: ...


class Versioned(Protocol):
    version: int
    syncs: dict[str, int]


class WeightSync:
    def __init__(self, ray: Any, group: Publisher, calls: Inflight, workers: WorkerSet,
                 policy: RolloutPolicy, state: Versioned, every: int, feeder: Feeder):  # fmt: skip
        """`state`: the run state, whose `version` (the last published) and `syncs` (versions applied,
        per worker) this updates in place."""
        self.ray, self.group, self.calls, self.workers = ray, group, calls, workers
        self.p, self.state, self.every, self.feeder = policy, state, every, feeder

    # ---- publish
    def maybe_publish(self, step: int) -> dict[str, float]:
        """`publish` when `step` is a multiple of sync.every; its metrics (else none)."""
        return self.publish() if step % self.every == 0 else {}

    def publish(self) -> dict[str, float]:
        """Rank 0 sends the next weights version to every worker (sm_dist.sync); the confirmations
        still to come are tracked beside the rollouts."""
        t0 = time.perf_counter()
        self.state.version += 1
        d = self.group.publish(self.state.version)
        self._track(d)
        return {**d.metrics, "sync/publish_s": time.perf_counter() - t0}

    def reconnect(self) -> None:
        """Rank 0's sender follows the live workers (after scaling)."""
        self.group.connect(self.workers.handles, self.workers.names)

    def give(self, i: int) -> int:
        """Worker i (joined, or restarted with its initial weights) gets the latest weights; its first
        batch goes out once they are applied (rule 2). Synchronous mode waits for them here. Returns the
        version sent (0: none published, its weights are current)."""
        d = self.group.resend(i)
        name = self.workers.names[i]
        if d.pending and not self.p.asynchronous:  # synchronous: applied before the next round
            confirm_version(name, self.ray.get(d.pending[i], timeout=self.p.sync_timeout_s), d.version)
            self._count(name)
        elif d.pending:
            self._track(d)
            self.workers.awaiting.add(i)
        elif self.feeder.feeding:  # nothing to wait for: a collective send confirmed, or nothing published
            self.feeder.submit(i)
        return d.version

    def resend(self, i: int) -> None:
        """The latest weights to worker i again (a send that found it briefly unavailable)."""
        self._track(self.group.resend(i))

    def _track(self, d: Delivery) -> None:
        now = time.monotonic()
        for i, fut in d.pending.items():
            self.calls.add(fut, SyncCall(i, d.version, now), self)
        if not d.pending and d.version:  # rule 3: a collective send
            for name in self.workers.names:
                self._count(name)

    def _count(self, name: str) -> None:
        self.state.syncs[name] = self.state.syncs.get(name, 0) + 1

    # ---- confirmations
    def on_answer(self, fut: Any, call: SyncCall) -> None:
        try:
            out, died = answer_or_death(self.ray, fut)
        except self.ray.exceptions.ObjectLostError:  # the sender's process (a dead learner) owned the call
            return
        if died is not None:
            self.feeder.worker_died(call, died)
            return
        name = self.workers.names[call.worker]
        confirm_version(name, out, call.version)
        self._count(name)
        if call.worker in self.workers.awaiting:  # rule 2: its first batch now
            self.workers.awaiting.discard(call.worker)
            if self.feeder.feeding:
                self.feeder.submit(call.worker)

    def drop(self) -> None:
        """Forget the confirmations in flight (their sender is gone: the learners restarted)."""
        self.calls.drop(lambda c: not isinstance(c, SyncCall))

    def check_deadline(self, now: float | None = None) -> None:
        """Rule 4: a weight version not applied within sync.timeout_s raises."""
        now = time.monotonic() if now is None else now
        for _, c in self.calls.of(SyncCall):
            if now - c.sent_at > self.p.sync_timeout_s:
                raise WeightSyncError(
                    f"{self.workers.names[c.worker]} did not apply weights version {c.version} within "
                    f"sync.timeout_s={self.p.sync_timeout_s}s"
                )
