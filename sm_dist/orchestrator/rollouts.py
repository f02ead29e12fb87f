"""The rollout side of the run: every live worker always has one `run_batch` in flight; a landed batch
is counted and the worker's next one goes out at once, while the learners step.

    sched = Rollouts(ray, calls, workers, policy, group, state, every, restarts)
    sched.submit_all()               # asynchronous mode: one batch per worker, then self-resubmitting
    calls.wait_for(learner_futures)  # (sm_dist/orchestrator/calls.py) batches land and go out again
    sched.sync.maybe_publish(step)   # the weights (sm_dist/orchestrator/weight_sync.py)
    sched.drain()                    # at the end: in-flight batches and syncs land, none resubmitted

A batch is driven by its answers, not by a thread per worker: the driver's one wait
(`Inflight.wait_for`) hands each landed batch to `on_answer`, which resubmits. A worker that dies (its
actor process is gone) is restarted by Ray (`rollout.max_restarts`; `WorkerRestarts` in faults.py waits
for it), given its prompt shard and the latest weights, and its batch goes out once they are applied.
Its lost batch is simply not in the buffer; acknowledged rows are untouched.
"""

from __future__ import annotations

import logging
from typing import Any

from sm_dist.orchestrator.calls import (
    BatchCall,
    Call,
    Inflight,
    RolloutPolicy,
    SyncCall,
    WorkerSet,
    answer_or_death,
)
from sm_dist.orchestrator.faults import WorkerRestarts
from sm_dist.orchestrator.weight_sync import Publisher, Versioned, WeightSync

log = logging.getLogger("sm_dist.driver")


class Rollouts:
    def __init__(self, ray: Any, calls: Inflight, workers: WorkerSet, policy: RolloutPolicy,
                 group: Publisher, state: Versioned, every: int, restarts: WorkerRestarts,
                 batches: int = 0):  # fmt: skip
        """`group`: the learners (publish, resend); `state`: the run state the weights update;
        `every`: sync.every; `batches`: the batches landed before (a resumed run's)."""
        self.ray, self.calls, self.ws, self.p, self.restarts = ray, calls, workers, policy, restarts
        self.sync = WeightSync(ray, group, calls, workers, policy, state, every, feeder=self)
        self.stopping = False  # a stop was asked for (a signal, the control API): nothing resubmitted
        self.paused = False  # the control API's pause: landed batches are not resubmitted
        self.batches = batches  # rollout batches landed (all workers, the run's)
        self.gen_s = 0.0  # seconds the workers spent generating
        self.stats: dict[str, list[float]] = {}  # rollout/... values since the last `take_stats`

    @property
    def workers(self) -> list:
        """The live workers' actor handles, in index order."""
        return self.ws.handles

    @property
    def feeding(self) -> bool:
        """Does a landed batch get its worker's next one?"""
        return self.p.asynchronous and not self.stopping and not self.paused

    def submit(self, i: int) -> None:
        self.calls.add(self.ws.handles[i].run_batch.remote(), BatchCall(i), self)

    def submit_all(self) -> None:
        for i in range(len(self.ws.handles)):
            self.submit(i)

    def resume(self) -> None:
        """After a pause: a batch for every live worker that has none in flight (nor awaits weights)."""
        busy = {c.worker for _, c in self.calls.of(BatchCall)}
        for i in range(len(self.ws.handles)):
            if i not in busy and i not in self.ws.awaiting and self.feeding:
                self.submit(i)

    def on_answer(self, fut: Any, call: BatchCall) -> None:
        out, died = answer_or_death(self.ray, fut)
        if died is not None:
            self.worker_died(call, died)
            return
        self.restarts.answered(call.worker)
        self.count_batch(out)
        if self.feeding:
            self.submit(call.worker)

    def count_batch(self, out: dict) -> None:
        self.batches += 1
        self.gen_s += out.get("rollout/gen_s", 0.0)
        for k, v in out.items():
            self.stats.setdefault(k, []).append(v)

    def worker_died(self, call: Call, err: Exception) -> None:
        """Worker `call.worker` died during `call`: wait for Ray to restart it, give it its prompt shard
        and the latest weights; its batch goes out once they are applied (weight_sync.py, rule 2)."""
        from sm_dist.orchestrator.actors import describe_error

        i, why = call.worker, describe_error(err)
        if self.restarts.still_alive(i, err, why):  # a lagging view of a restart: the call again
            if isinstance(call, SyncCall):
                self.sync.resend(i)
            elif self.feeding and i not in self.ws.awaiting:  # an awaited worker's batch follows its weights
                self.submit(i)
            return
        kind = "a batch" if isinstance(call, BatchCall) else f"the sync of version {call.version}"
        self.restarts.restarted(i, err, why, kind)  # raises past rollout.max_restarts
        self.calls.drop(lambda c: not (isinstance(c, (BatchCall, SyncCall)) and c.worker == i))
        self.ws.awaiting.discard(i)
        self.ws.rejoined(i)
        self.sync.give(i)

    def _batches_in_flight(self) -> bool:
        return bool(self.calls.of(BatchCall))

    def run_round(self) -> None:
        """Synchronous mode: one batch per worker, learners idle meanwhile."""
        self.submit_all()
        while self._batches_in_flight():
            self.calls.wait_one(self.p.sync_timeout_s, "a synchronous rollout round runs (sync.timeout_s)")

    def drain(self) -> None:
        """Stop resubmitting and let every in-flight batch and sync land, so the final state counts them
        (cancel the joins first: `WorkerPool.cancel_joins`)."""
        self.stopping = True
        while len(self.calls):
            self.calls.wait_one(self.p.sync_timeout_s, "the run finishes (sync.timeout_s)")

    def take_stats(self) -> dict[str, float]:
        """Means of the rollout/... values since the last call, and the sync and batch counters."""
        out = {k: sum(v) / len(v) for k, v in self.stats.items()}
        self.stats = {}
        syncs = self.sync.state.syncs
        out["sync/applied_min"] = float(min(syncs.get(n, 0) for n in self.ws.names))
        out["rollout/batches_total"] = float(self.batches)
        return out
