"""The rollout side of the run: each live worker is driven by its own loop, a task on the driver's event
loop (sm_dist/orchestrator/tasks.py) that submits `run_batch`, awaits it, counts it, and submits the
next, while the learners step.

    sched = Rollouts(ray, tasks, workers, policy, sync, restarts)
    sched.start()                          # asynchronous mode: a loop per worker, self-resubmitting
    await sched.next_batch(30.0, "why")    # the sampler waits for fresh rows (sampler.py)
    await sched.run_round()                # synchronous mode: one batch per worker, learners idle
    await sched.drain()                    # at the end: in-flight batches land, none go out again

A worker's loop submits only while the run is neither paused nor stopping, and only once the worker
holds the latest weights (weight_sync.py, rule 2). A worker that dies (its actor process is gone) is
restarted by Ray (`rollout.max_restarts`; `WorkerRestarts` in faults.py waits for it) and given its
prompt shard and the latest weights by its own loop, which goes on once they are applied. Its lost
batch is simply not in the buffer; acknowledged rows are untouched. A removed worker (scaling.py) whose
batch is in flight is `retiring`: its loop counts that last batch, then kills it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sm_dist.orchestrator.actors import describe_error
from sm_dist.orchestrator.faults import WorkerRestarts
from sm_dist.orchestrator.tasks import RolloutPolicy, Tasks, WorkerSet, is_death, within
from sm_dist.orchestrator.weight_sync import WeightSync

log = logging.getLogger("sm_dist.driver")


class Rollouts:
    def __init__(self, ray: Any, tasks: Tasks, workers: WorkerSet, policy: RolloutPolicy, sync: WeightSync,
                 restarts: WorkerRestarts, batches: int = 0):  # fmt: skip
        """`sync`: the weights on their way to the workers; `batches`: the batches landed before (a
        resumed run's)."""
        self.ray, self.tasks, self.ws, self.p, self.sync = ray, tasks, workers, policy, sync
        self.restarts = restarts
        self.loops: dict[str, asyncio.Task] = {}  # name -> its worker's loop
        self.busy: set[str] = set()  # workers with a batch in flight
        self.retiring: dict[str, tuple[float, Any]] = {}  # removed, batch in flight: (when, its handle)
        self.stopping = False  # a stop was asked for (a signal, the control API): nothing resubmitted
        self.paused = False  # the control API's pause: no batch goes out until resumed
        self.batches = batches  # rollout batches landed (all workers, the run's)
        self.gen_s = 0.0  # seconds the workers spent generating
        self.stats: dict[str, list[float]] = {}  # rollout/... values since the last `take_stats`

    @property
    def workers(self) -> list:
        """The live workers' actor handles, in index order."""
        return self.ws.handles

    def start(self) -> None:
        """Asynchronous mode: every live worker's loop (call it on the event loop)."""
        for name in self.ws.names:
            self.add(name)

    def add(self, name: str) -> None:
        """Worker `name` (live) gets its loop, in asynchronous mode."""
        if self.p.asynchronous and name not in self.loops:
            self.loops[name] = self.tasks.spawn(self._drive(self.ws.handle(name), name))

    def pause(self, paused: bool) -> None:
        self.paused = paused
        self.tasks.changed()

    async def _drive(self, handle: Any, name: str) -> None:
        """Worker `name`'s loop: a batch whenever it may have one, until the run stops or it is removed."""
        try:
            while await self._may_submit(name):
                await self._batch(handle, name)
                if self.retiring.pop(name, None) is not None:
                    self.ray.kill(handle, no_restart=True)
                    log.info(f"rollout worker {name} removed after its last batch")
                    return
        finally:
            self.loops.pop(name, None)

    async def _may_submit(self, name: str) -> bool:
        """Wait while paused or while its first weights are on their way; False once stopping or removed."""

        def gone() -> bool:
            return self.stopping or name not in self.ws.names

        await self.tasks.until(lambda: gone() or not (self.paused or name in self.ws.awaiting))
        return not gone()

    async def _batch(self, handle: Any, name: str) -> None:
        """One batch on worker `name`, counted when it lands; a death restarts the worker (no batch)."""
        self.busy.add(name)
        try:
            out = await handle.run_batch.remote()
        except self.ray.exceptions.RayError as e:
            if not is_death(self.ray, e) and name not in self.retiring:
                raise  # an error inside a live worker (e.g. the replay buffer it writes to died)
            self.busy.discard(name)  # not retiring any more while it restarts
            await self._died(handle, name, e)
            return
        finally:
            self.busy.discard(name)
        self.restarts.answered(name)
        self.count_batch(out)

    def count_batch(self, out: dict) -> None:
        self.batches += 1
        self.gen_s += out.get("rollout/gen_s", 0.0)
        for k, v in out.items():
            self.stats.setdefault(k, []).append(v)
        self.tasks.changed()

    async def _died(self, handle: Any, name: str, err: Exception) -> None:
        """Worker `name` died during a batch: wait for Ray to restart it, give it its prompt shard and the
        latest weights; its next batch goes out once they are applied (weight_sync.py, rule 2). A
        removed worker whose last batch failed is dropped."""
        why = describe_error(err)
        if self.retiring.pop(name, None) is not None:
            log.warning(f"rollout worker {name} failed during its last batch ({why}); dropped")
            self.ray.kill(handle, no_restart=True)
            return
        if await self.restarts.still_alive(name, err, why):  # a lagging view of a restart: the call again
            return
        self.sync.forget(name)  # the weights it was sent died with it: no deadline while it restarts
        await self.restarts.restarted(name, err, why, "a batch")  # raises past rollout.max_restarts
        self.ws.rejoined(name)
        await self.sync.give(name)

    def retire(self, name: str, handle: Any) -> bool:
        """Worker `name` was removed from the live set: its in-flight batch lands and is counted, then its
        loop kills it (True); with none in flight it is killed now (False)."""
        if name in self.busy:
            self.retiring[name] = (time.monotonic(), handle)
            return True
        self._end(name, handle)
        return False

    def check_retiring(self, now: float | None = None) -> None:
        """A retiring worker whose last batch has not landed within sync.timeout_s is killed (its batch
        abandoned: none of its rows were acknowledged)."""
        now = time.monotonic() if now is None else now
        timeout = self.p.sync_timeout_s
        for name, (since, handle) in list(self.retiring.items()):
            if now - since > timeout:
                self._end(name, handle)
                log.warning(f"removed rollout worker {name}: its last batch was abandoned after {timeout}s")

    def _end(self, name: str, handle: Any) -> None:
        self.retiring.pop(name, None)
        if (loop := self.loops.pop(name, None)) is not None:
            loop.cancel()
        self.ray.kill(handle, no_restart=True)

    async def next_batch(self, timeout_s: float, what: str) -> None:
        """Wait until a batch lands (or a stop, or a fatal error: raised); `what` says why the caller
        waits."""
        self.tasks.check()
        if not self.loops:
            raise RuntimeError(f"{what}, but no rollout call is in flight")
        n = self.batches

        def ready() -> bool:
            return self.batches > n or self.stopping or self.tasks.failure is not None

        await within(
            self.tasks.until(ready), timeout_s, f"no rollout worker answered within {timeout_s}s while {what}"
        )
        self.tasks.check()

    async def run_round(self) -> None:
        """Synchronous mode: one batch per worker, learners idle meanwhile."""
        await asyncio.gather(
            *(self._batch(h, n) for h, n in zip(self.ws.handles, self.ws.names, strict=True))
        )

    async def drain(self) -> None:
        """Stop resubmitting and let every in-flight batch and sync land, so the final state counts them
        (cancel the joins first: `WorkerPool.cancel_joins`); a fatal error met meanwhile raises."""
        self.stopping = True
        self.tasks.changed()
        loops = list(self.loops.values())
        if loops:
            _, late = await asyncio.wait(loops, timeout=self.p.sync_timeout_s)
            if late:
                raise TimeoutError(
                    f"no rollout worker answered within {self.p.sync_timeout_s}s while the run finishes "
                    "(sync.timeout_s)"
                )
        await self.sync.settle()
        self.tasks.check()

    def take_stats(self) -> dict[str, float]:
        """Means of the rollout/... values since the last call, and the sync and batch counters."""
        out = {k: sum(v) / len(v) for k, v in self.stats.items()}
        self.stats = {}
        syncs = self.sync.state.syncs
        out["sync/applied_min"] = float(min(syncs.get(n, 0) for n in self.ws.names))
        out["rollout/batches_total"] = float(self.batches)
        return out
