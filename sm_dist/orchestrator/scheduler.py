"""The rollout side of the driver loop: which call each worker has in flight, what its answer means,
and what to do when a worker dies or a weight sync is late.

    sched = RolloutScheduler(ray, workers, names, policy)
    sched.submit_batch(i)                 # a `run_batch` in flight on worker i
    sched.track(delivery)                 # a weight version on its way (sm_dist.sync.base.Delivery)
    sched.wait_for(learner_futures)       # wait for the learners; handle worker answers meanwhile
    sched.check_sync_deadline()           # a version not applied within sync.timeout_s raises
    sched.add_workers(handles, names)     # scaling (sm_dist/orchestrator/scaling.py): started, joining later
    sched.admit_joined()                  # between steps: the ready ones join (weights, then batches)
    sched.remove_worker(i)                # its in-flight batch lands (a `RetireCall`), then it is killed

Every in-flight call is a typed record (`BatchCall`, `SyncCall`) keyed by its future. A worker that
dies (its actor process is gone) is restarted by Ray (`rollout.max_restarts`); the scheduler waits for
it, has the learner re-send the latest weights (`resend`, when the transport survives restarts) and
resubmits its batch. Its lost batch is simply not in the buffer; acknowledged rows are untouched.
`ray` is the module, or any object with its `wait`/`get`/`exceptions` (the unit tests pass a fake).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sm_dist.sync.base import Delivery, WeightSyncError, confirm_version

log = logging.getLogger("sm_dist.driver")


@dataclass(frozen=True)
class BatchCall:
    """`run_batch` on worker `worker`."""

    worker: int


@dataclass(frozen=True)
class SyncCall:
    """Worker `worker` is applying weights `version`, sent at `sent_at` (monotonic seconds)."""

    worker: int
    version: int
    sent_at: float


@dataclass(frozen=True)
class JoinCall:
    """A worker being added: its constructor (vLLM start-up) runs; `version` answers when it is ready.
    It has no index until it is admitted (`admit_joined`, between two learner steps)."""

    handle: Any
    name: str
    worker: int = -1


@dataclass(frozen=True)
class RetireCall:
    """The last batch of a removed worker: its rows are acknowledged in the buffer when it lands (or
    lost with it, never half-written); then the worker is killed."""

    handle: Any
    name: str
    since: float = 0.0  # monotonic seconds when it was removed
    worker: int = -1


@dataclass(frozen=True)
class RolloutPolicy:
    """The settings the scheduler follows (from rollout.*, sync.*, run.*)."""

    max_restarts: int
    sync_timeout_s: float
    startup_timeout_s: float
    asynchronous: bool = True
    restarts_rejoin: bool = True  # the weight transport takes a restarted worker back


class RolloutScheduler:
    def __init__(
        self,
        ray: Any,
        workers: list,
        names: list[str],
        policy: RolloutPolicy,
        resend: Callable[[int], Delivery] | None = None,
        syncs: dict[str, int] | None = None,
        reconnect: Callable[[list, list[str]], None] | None = None,
    ):
        """`resend(i)` re-sends the latest weights to worker i (the learner's end of the transport);
        `syncs` counts the versions each worker applied (the run state's, updated in place);
        `reconnect(workers, names)` points the learner's sender at a new worker list (scaling)."""
        self.ray, self.workers, self.names, self.p = ray, workers, names, policy
        self.resend, self.reconnect = resend, reconnect
        self.inflight: dict[Any, BatchCall | SyncCall | JoinCall | RetireCall] = {}
        self.joined: list[tuple[Any, str]] = []  # added workers ready, waiting for `admit_joined`
        self.awaiting: set[int] = set()  # admitted workers whose first weights are on their way
        self.rejoined: Callable[[int], None] | None = None  # called with i after worker i restarted
        self.syncs = {} if syncs is None else syncs
        self.restarts: dict[str, int] = {}
        self.incarnations: dict[str, str] = {}  # name -> the process a restarted worker answered from
        self.unavailable: dict[str, int] = {}  # name -> failed calls in a row while that process lives
        self.stopping = False
        self.paused = False  # the control API's pause: landed batches are not resubmitted
        self.batches = 0  # rollout batches landed (all workers)
        self.gen_s = 0.0  # seconds the workers spent generating
        self.stats: dict[str, list[float]] = {}  # rollout/... values since the last `take_stats`

    @property
    def feeding(self) -> bool:
        """Does a landed batch get its worker's next one?"""
        return self.p.asynchronous and not self.stopping and not self.paused

    # ---- calls
    def submit_batch(self, i: int) -> None:
        self.inflight[self.workers[i].run_batch.remote()] = BatchCall(i)

    def submit_all(self) -> None:
        for i in range(len(self.workers)):
            self.submit_batch(i)

    def track(self, d: Delivery) -> None:
        """A weight version on its way: its pending confirmations join the in-flight calls; a delivery
        with none (a collective send returns once every worker confirmed) counts as applied."""
        now = time.monotonic()
        for i, fut in d.pending.items():
            self.inflight[fut] = SyncCall(i, d.version, now)
        if not d.pending and d.version:
            for name in self.names:
                self._count_sync(name)

    def drop_syncs(self) -> None:
        """Forget the confirmations in flight (their sender is gone: the learners restarted)."""
        for f, c in list(self.inflight.items()):
            if isinstance(c, SyncCall):
                del self.inflight[f]

    def batches_in_flight(self) -> bool:
        return any(isinstance(c, BatchCall) for c in self.inflight.values())

    # ---- answers
    def handle(self, fut) -> None:
        """Take the answer of one in-flight call."""
        call = self.inflight.pop(fut)
        if isinstance(call, (JoinCall, RetireCall)):
            self._handle_scaling(fut, call)
            return
        ex = self.ray.exceptions
        try:
            out = self.ray.get(fut)
        except ex.RayActorError as e:
            if isinstance(e, ex.RayTaskError):
                raise  # the worker is alive; an actor it called (e.g. the replay buffer) died
            self.worker_died(call, e)
            return
        except ex.ObjectLostError:
            if isinstance(call, SyncCall):  # the sender's process (a dead learner) owned the call
                return
            raise
        self.unavailable.pop(self.names[call.worker], None)
        if isinstance(call, SyncCall):
            confirm_version(self.names[call.worker], out, call.version)
            self._count_sync(self.names[call.worker])
            if call.worker in self.awaiting:  # an added worker's first weights: its first batch now
                self.awaiting.discard(call.worker)
                if self.feeding:
                    self.submit_batch(call.worker)
            return
        self._count_batch(out)
        if self.feeding:
            self.submit_batch(call.worker)

    def _count_batch(self, out: dict) -> None:
        self.batches += 1
        self.gen_s += out.get("rollout/gen_s", 0.0)
        for k, v in out.items():
            self.stats.setdefault(k, []).append(v)

    def _count_sync(self, name: str) -> None:
        self.syncs[name] = self.syncs.get(name, 0) + 1

    def wait_for(self, futures: list, timeout_s: float | None = None) -> list:
        """Wait for `futures` (e.g. the learners'), handling worker answers meanwhile; return their
        results. A failed future raises as soon as it lands: when one learner rank dies, the others
        hang in their collective and would never finish."""
        pending, results = list(futures), {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = self.ray.wait(pending + list(self.inflight), num_returns=1, timeout=left)
            if not ready:
                raise TimeoutError(f"{len(pending)} calls did not finish within {timeout_s}s")
            for f in ready:
                if f in self.inflight:
                    self.handle(f)
                elif f in pending:
                    pending.remove(f)
                    results[f] = self.ray.get(f)
        return [results[f] for f in futures]

    def wait_one(self, timeout_s: float, what: str) -> None:
        """Handle the next worker answer; raise when none comes within `timeout_s` (`what` says why
        the caller waited)."""
        if not self.inflight:
            raise RuntimeError(f"{what}, but no rollout call is in flight")
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"no rollout worker answered within {timeout_s}s while {what}")
        self.handle(ready[0])

    def poll(self, timeout_s: float) -> None:
        """Handle whatever answers land within `timeout_s` (none in flight: just wait)."""
        if not self.inflight:
            time.sleep(timeout_s)
            return
        ready, _ = self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=timeout_s)
        for f in ready:
            if f in self.inflight:
                self.handle(f)

    def resume_batches(self) -> None:
        """After a pause: a batch for every live worker that has none in flight (nor awaits weights)."""
        busy = {c.worker for c in self.inflight.values() if isinstance(c, BatchCall)}
        for i in range(len(self.workers)):
            if i not in busy and i not in self.awaiting and self.feeding:
                self.submit_batch(i)

    def drain(self) -> None:
        """Stop resubmitting and let every in-flight batch and sync land, so the final state counts them
        (workers still starting are dropped: they never had work)."""
        self.stopping = True
        self.cancel_joins()
        while self.inflight:
            self.wait_one(self.p.sync_timeout_s, "the run finishes (sync.timeout_s)")

    def run_round(self) -> None:
        """Synchronous mode: one batch per worker, learners idle meanwhile."""
        self.submit_all()
        while self.batches_in_flight():
            self.wait_one(self.p.sync_timeout_s, "a synchronous rollout round runs (sync.timeout_s)")

    def check_sync_deadline(self, now: float | None = None) -> None:
        """A weight version not applied within sync.timeout_s raises; a removed worker whose last batch
        has not landed within it is killed (its batch abandoned: none of its rows were acknowledged)."""
        now = time.monotonic() if now is None else now
        for f, c in list(self.inflight.items()):
            if isinstance(c, RetireCall) and now - c.since > self.p.sync_timeout_s:
                del self.inflight[f]
                self.ray.kill(c.handle, no_restart=True)
                log.warning(
                    f"removed rollout worker {c.name}: its last batch was abandoned after {self.p.sync_timeout_s}s"
                )
        for c in self.inflight.values():
            if isinstance(c, SyncCall) and now - c.sent_at > self.p.sync_timeout_s:
                raise WeightSyncError(
                    f"{self.names[c.worker]} did not apply weights version {c.version} within "
                    f"sync.timeout_s={self.p.sync_timeout_s}s"
                )

    # ---- failures
    def worker_died(self, call: BatchCall | SyncCall, err: Exception) -> None:
        """Worker `call.worker` died during `call`: wait for Ray to restart it, give it the latest
        weights, and resubmit its batch."""
        from sm_dist.orchestrator.actors import describe_error

        i = call.worker
        name = self.names[i]
        why = describe_error(err)
        if self._still_alive(call, err, why):
            return
        n = self.restarts[name] = self.restarts.get(name, 0) + 1
        if n > self.p.max_restarts:
            raise RuntimeError(
                f"rollout worker {name} died {n} times (rollout.max_restarts={self.p.max_restarts}); last: {why}"
            ) from err
        if not self.p.restarts_rejoin:
            raise RuntimeError(
                f"rollout worker {name} died ({why}); a restarted worker cannot rejoin this sync.transport's "
                "group. Resume the run (--resume), or use sync.transport=object_store, which survives "
                "worker restarts"
            ) from err
        kind = "a batch" if isinstance(call, BatchCall) else f"the sync of version {call.version}"
        log.warning(f"rollout worker {name} died during {kind} ({why}); restart {n}/{self.p.max_restarts}")
        for f, c in list(self.inflight.items()):  # the dead incarnation's other calls fail too
            if c.worker == i:
                del self.inflight[f]
        self.incarnations[name] = self._wait_restarted(i)
        self.awaiting.discard(i)
        if self.rejoined is not None:  # e.g. its current prompt shard again (scaling re-sharded them)
            self.rejoined(i)
        # it restarted with its initial weights: its lost batch (whichever call failed) goes out only
        # once it holds the current ones, never before (a batch sent now could run first: Ray orders
        # calls per caller, and the weights come from the learner, the batch from the driver)
        self._give_weights(i)

    def _still_alive(self, call: BatchCall | SyncCall, err: Exception, why: str) -> bool:
        """A call that failed with ActorUnavailableError ("the actor is restarting") on a worker Ray
        already restarted, whose new process still answers: a caller's view of the restart lagged (e.g.
        the learner re-sending weights right after it), not a second death. The call goes out again."""
        i, name = call.worker, self.names[call.worker]
        if not isinstance(err, self.ray.exceptions.ActorUnavailableError) or name not in self.incarnations:
            return False
        if isinstance(call, SyncCall) and self.resend is None:
            return False
        if self._wait_restarted(i) != self.incarnations[name]:
            return False  # a new process: it did die again
        n = self.unavailable[name] = self.unavailable.get(name, 0) + 1
        if n > 10:
            raise RuntimeError(
                f"rollout worker {name}: {n} calls in a row failed as unavailable while its process lives; "
                "the Ray cluster is unhealthy (see `ray status` and the run dir's logs)"
            ) from err
        log.warning(f"rollout worker {name} was unavailable for one call ({why}); sent again")
        time.sleep(0.5)  # let the caller's view of the actor catch up
        if isinstance(call, SyncCall):
            self.track(self.resend(i))
        elif self.feeding and i not in self.awaiting:  # an awaited worker's batch follows its weights
            self.submit_batch(i)
        return True

    def _wait_restarted(self, i: int) -> str:
        """Wait until worker i answers (Ray restarts a dead one); returns its process (`incarnation`)."""
        from sm_dist.rollout.worker import incarnation

        ex = self.ray.exceptions
        deadline = time.monotonic() + self.p.startup_timeout_s
        while True:  # calls fail with ActorUnavailableError while Ray restarts the actor
            try:
                return self.ray.get(
                    self.workers[i].__ray_call__.remote(incarnation),
                    timeout=max(1.0, deadline - time.monotonic()),
                )
            except (ex.ActorUnavailableError, ex.GetTimeoutError) as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"rollout worker {self.names[i]} did not restart within run.startup_timeout_s="
                        f"{self.p.startup_timeout_s}s"
                    ) from e
                time.sleep(0.5)

    # ---- scaling: called between learner steps (sm_dist/orchestrator/scaling.py decides who and when)
    def add_workers(self, handles: list, names: list[str]) -> None:
        """Workers being added: each is admitted (`admit_joined`) once its constructor has answered."""
        for h, n in zip(handles, names, strict=True):
            self.inflight[h.version.remote()] = JoinCall(h, n)

    def pending_joins(self) -> int:
        """Added workers not admitted yet (starting, or ready and waiting for `admit_joined`)."""
        return len(self.joined) + sum(isinstance(c, JoinCall) for c in self.inflight.values())

    def cancel_joins(self, most: int | None = None) -> int:
        """Kill up to `most` (None: all) added workers not admitted yet, the latest first; how many."""
        starting = [(f, c.handle) for f, c in self.inflight.items() if isinstance(c, JoinCall)]
        victims = (starting[::-1] + [(None, h) for h, _ in self.joined[::-1]])[:most]
        for f, h in victims:
            if f is None:
                self.joined = [(jh, n) for jh, n in self.joined if jh is not h]
            else:
                del self.inflight[f]
            self.ray.kill(h, no_restart=True)
        return len(victims)

    def _handle_scaling(self, fut, call: JoinCall | RetireCall) -> None:
        try:
            out = self.ray.get(fut)
        except self.ray.exceptions.RayError as e:
            from sm_dist.orchestrator.actors import describe_error

            what = "failed to start" if isinstance(call, JoinCall) else "failed during its last batch"
            log.warning(f"rollout worker {call.name} {what} ({describe_error(e)}); dropped")
            self.ray.kill(call.handle, no_restart=True)
            return
        if isinstance(call, JoinCall):
            self.joined.append((call.handle, call.name))
            return
        self._count_batch(out)  # its rows are in the buffer: the batch returns once the sink acknowledged
        self.ray.kill(call.handle, no_restart=True)
        log.info(f"rollout worker {call.name} removed after its last batch")

    def admit_joined(self) -> list[int]:
        """Admit the added workers that are ready: into the lists, the learner's sender reconnected, the
        latest weights re-sent. A worker's first batch goes out once its weights are applied, so its
        first rollouts carry the version current when it joined (or a later one). Returns their indices."""
        if not self.joined:
            return []
        new = []
        for h, n in self.joined:
            self.workers.append(h)
            self.names.append(n)
            new.append(len(self.workers) - 1)
        self.joined = []
        if self.reconnect is not None:
            self.reconnect(self.workers, self.names)
        for i in new:
            if v := self._give_weights(i):
                log.info(f"rollout worker {self.names[i]} joins with weights version {v}")
        log.info(f"rollout workers {[self.names[i] for i in new]} joined; {len(self.workers)} now")
        return new

    def _give_weights(self, i: int) -> int:
        """Worker i (joined, or restarted with its initial weights) gets the latest weights; its first
        batch goes out once they are applied (on their confirmation, in `handle`), so no row it writes
        carries an older version. Synchronous mode waits for them here. Returns the version sent (0:
        none published, its weights are current)."""
        d = self.resend(i) if self.resend is not None else Delivery(0)
        if d.pending and not self.p.asynchronous:  # synchronous: applied before the next round
            confirm_version(
                self.names[i], self.ray.get(d.pending[i], timeout=self.p.sync_timeout_s), d.version
            )
            self._count_sync(self.names[i])
        elif d.pending:
            self.track(d)
            self.awaiting.add(i)
        elif self.feeding:  # nothing to wait for: a collective send confirmed, or nothing published
            self.submit_batch(i)
        return d.version

    def remove_worker(self, i: int) -> str:
        """Take worker `i` out; returns its name. Its in-flight batch becomes a `RetireCall` (it lands,
        its rows acknowledged, then the worker is killed); with none in flight it is killed now. The
        indices above `i` shift down by one, and the learner's sender is reconnected."""
        if len(self.workers) <= 1:
            raise ValueError("cannot remove the last rollout worker")
        h, name = self.workers.pop(i), self.names.pop(i)
        self.incarnations.pop(name, None)  # a later worker may take the name
        retiring = False
        for f, c in list(self.inflight.items()):
            if isinstance(c, (JoinCall, RetireCall)):
                continue
            if c.worker == i and isinstance(c, BatchCall):
                self.inflight[f] = RetireCall(h, name, time.monotonic())
                retiring = True
            elif c.worker == i:  # a weight confirmation it no longer needs
                del self.inflight[f]
            elif c.worker > i:
                self.inflight[f] = dataclasses.replace(c, worker=c.worker - 1)
        self.awaiting = {j - (j > i) for j in self.awaiting if j != i}
        if not retiring:
            self.ray.kill(h, no_restart=True)
        if self.reconnect is not None:
            self.reconnect(self.workers, self.names)
        log.info(
            f"rollout worker {name} removed{' once its batch lands' if retiring else ''}; {len(self.workers)} left"
        )
        return name

    # ---- metrics
    def take_stats(self) -> dict[str, float]:
        """Means of the rollout/... values since the last call, and the sync and batch counters."""
        out = {k: sum(v) / len(v) for k, v in self.stats.items()}
        self.stats = {}
        out["sync/applied_min"] = float(min(self.syncs.get(n, 0) for n in self.names))
        out["rollout/batches_total"] = float(self.batches)
        return out
