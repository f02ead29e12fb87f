"""One owner of the weights on their way to the rollout workers: the publish every `sync.every`
steps, the confirmations in flight, the re-sends to joined or restarted workers, and the deadline.

    sync = WeightSync(ray, group, tasks, workers, policy, state, every, restarts)
    for step in ...:
        metrics.update(await sync.maybe_publish(step))  # every sync.every steps: version + 1, rank 0 sends
        sync.check_deadline()                      # a version not applied within sync.timeout_s raises
    await sync.give("w3")                          # a worker joined or restarted: the latest version
    sync.drop(); ...; await sync.publish()         # the learners restarted: their weights, a new version

Each confirmation is awaited by a task of its own (sm_dist/orchestrator/tasks.py).

Ordering rules:
1. Versions only grow: `publish` tags the learners' weights with `state.version + 1`; a learner restart
   drops the confirmations in flight (their sender is gone) and publishes the restored weights under
   a new version, so the workers never keep the lost steps' weights under a version the run counts.
2. A worker that joins or restarts generates only once it holds the latest version: its first batch
   goes out on the confirmation (its loop waits while it is in `WorkerSet.awaiting`), never before (the weights come from learner rank 0,
   the batch from the driver, and Ray orders calls per caller only).
3. An object-store send returns at once and each worker's confirmation is awaited here; a collective
   send (gloo, nccl) returns once every worker has the version, and counts as applied by all.
4. A confirmation not in within `sync.timeout_s` of its send raises `WeightSyncError` naming the
   worker and the version.
5. A confirmation that finds its worker dead is dropped: the worker's loop meets the death on its next
   call and restarts it (rollouts.py); one that finds it "restarting" while its new process answers
   (a lagging view of a restart) is sent again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from sm_dist.orchestrator.actors import describe_error
from sm_dist.orchestrator.tasks import RolloutPolicy, Tasks, WorkerSet, is_death, within
from sm_dist.sync.base import Delivery, WeightSyncError, confirm_version


class Publisher(Protocol):
    """The learners, as the weights need them (`sm_dist.orchestrator.learners.LearnerGroup`)."""

    async def publish(self, version: int) -> Delivery: ...

    async def resend(self, index: int) -> Delivery: ...

    async def connect(self, workers: list, names: list[str]) -> None: ...


class Restarts(Protocol):
    """Tells a worker's death from a lagging view of its restart (`faults.WorkerRestarts`)."""

    async def still_alive(self, name: str, err: Exception, why: str) -> bool: ...


class Versioned(Protocol):
    version: int
    syncs: dict[str, int]


@dataclass(frozen=True)
class Sent:
    """Weights `version` sent to worker `name` at `at` (monotonic seconds), not confirmed yet."""

    name: str
    version: int
    at: float


class WeightSync:
    def __init__(self, ray: Any, group: Publisher, tasks: Tasks, workers: WorkerSet, policy: RolloutPolicy,
                 state: Versioned, every: int, restarts: Restarts):  # fmt: skip
        """`state`: the run state, whose `version` (the last published) and `syncs` (versions applied,
        per worker) this updates in place."""
        self.ray, self.group, self.tasks, self.workers = ray, group, tasks, workers
        self.p, self.state, self.every, self.restarts = policy, state, every, restarts
        self.sent: dict[asyncio.Task, Sent] = {}  # the confirmations in flight (done ones pruned)

    # ---- publish
    async def maybe_publish(self, step: int) -> dict[str, float]:
        """`publish` when `step` is a multiple of sync.every; its metrics (else none)."""
        return await self.publish() if step % self.every == 0 else {}

    async def publish(self) -> dict[str, float]:
        """Rank 0 sends the next weights version to every worker (sm_dist.sync); a task awaits each
        worker's confirmation."""
        t0 = time.perf_counter()
        self.state.version += 1
        d = await self.group.publish(self.state.version)
        self._track(d)
        return {**d.metrics, "sync/publish_s": time.perf_counter() - t0}

    async def reconnect(self) -> None:
        """Rank 0's sender follows the live workers (after scaling)."""
        await self.group.connect(self.workers.handles, self.workers.names)

    async def give(self, name: str) -> int:
        """Worker `name` (joined, or restarted with its initial weights) gets the latest weights; its
        first batch goes out once they are applied (rule 2). Synchronous mode waits for them here.
        Returns the version sent (0: none published, its weights are current)."""
        i = self.workers.index(name)
        d = await self.group.resend(i)
        if d.pending and not self.p.asynchronous:  # synchronous: applied before the next round
            t = self.p.sync_timeout_s
            late = f"{name} did not apply weights version {d.version} within {t}s"
            confirm_version(name, await within(d.pending[i], t, late), d.version)
            self._count(name)
        elif d.pending:
            self.workers.awaiting.add(name)
            self._track(d)
        return d.version

    def _track(self, d: Delivery) -> None:
        now = time.monotonic()
        for i, ref in d.pending.items():
            name = self.workers.names[i]
            self.sent[self.tasks.spawn(self._confirm(name, d.version, ref))] = Sent(name, d.version, now)
        if not d.pending and d.version:  # rule 3: a collective send
            for name in self.workers.names:
                self._count(name)

    def _count(self, name: str) -> None:
        self.state.syncs[name] = self.state.syncs.get(name, 0) + 1

    # ---- confirmations
    async def _confirm(self, name: str, version: int, ref: Any) -> None:
        """Worker `name`'s confirmation of `version`: counted, and the worker released (rule 2)."""
        while True:
            try:
                out = await ref
                break
            except self.ray.exceptions.ObjectLostError:  # the sender's process (a dead learner) owned it
                return
            except self.ray.exceptions.RayActorError as e:
                if not is_death(self.ray, e):
                    raise
                alive = name in self.workers.names and await self.restarts.still_alive(
                    name, e, describe_error(e)
                )
                if not alive:  # rule 5: its loop meets the death
                    self._release(name)
                    return
                d = await self.group.resend(self.workers.index(name))
                ref, version = d.pending[self.workers.index(name)], d.version
                self.sent[asyncio.current_task()] = Sent(name, version, time.monotonic())
        confirm_version(name, out, version)
        self._count(name)
        self._release(name)

    def _release(self, name: str) -> None:
        self.workers.awaiting.discard(name)
        self.tasks.changed()

    def pending(self) -> list[Sent]:
        """The confirmations still to come, oldest first."""
        self.sent = {t: s for t, s in self.sent.items() if not t.done()}
        return list(self.sent.values())

    def forget(self, name: str) -> None:
        """Drop worker `name`'s confirmations (it restarted or was removed)."""
        for t, s in self.sent.items():
            if s.name == name:
                t.cancel()

    def drop(self) -> None:
        """Forget the confirmations in flight (their sender is gone: the learners restarted)."""
        for t in self.sent:
            t.cancel()

    async def settle(self) -> None:
        """Wait until the confirmations in flight landed (sync.timeout_s)."""
        if todo := [t for t in self.sent if not t.done()]:
            _, late = await asyncio.wait(todo, timeout=self.p.sync_timeout_s)
            if late:
                self.check_deadline(now=float("inf"))

    def check_deadline(self, now: float | None = None) -> None:
        """Rule 4: a weight version not applied within sync.timeout_s raises."""
        now = time.monotonic() if now is None else now
        for s in self.pending():
            if now - s.at > self.p.sync_timeout_s:
                raise WeightSyncError(
                    f"{s.name} did not apply weights version {s.version} within "
                    f"sync.timeout_s={self.p.sync_timeout_s}s"
                )
