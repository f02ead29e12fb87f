"""The calls in flight between the driver and its actors, as typed records, and the one place that
waits on them.

    calls = Inflight(ray)
    calls.add(worker.run_batch.remote(), BatchCall(0), owner=rollouts)  # `rollouts.on_answer` takes it
    results = calls.wait_for(learner_futures)   # the learners' answers; worker answers handled meanwhile
    calls.check()                                # between steps: a fatal answer that landed meanwhile
    calls.wait_one(30.0, "the learner waits for fresh rows")

Only one thread waits (the driver's), and only here: while it waits for the learners, every worker
answer that lands goes to the part that made the call (its `owner`, fixed when the call is made):
`Rollouts` for batches, `WeightSync` for weight confirmations, `WorkerPool` for joins and retirements.
A fatal answer (a worker dead once too often, a wrong weight version, the replay buffer gone) that
lands while the learners work is kept until they are done (`failure`) and raised by `check` between
two steps, so the step they took is counted, logged and checkpointed like any other: a rescue
checkpoint then holds the step the metrics last show.
`ray` is the module, or any object with its `wait`/`get`/`kill`/`exceptions` (the unit tests pass a fake).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class CallOwner(Protocol):
    def on_answer(self, fut: Any, call: Call) -> None:
        """Take the answer of `call` (its future `fut` has landed: `ray.get` it)."""


class Waiter(Protocol):
    def wait_for(self, futures: list, timeout_s: float | None = None) -> list: ...


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
    It has no index until it is admitted (`WorkerPool.admit`, between two learner steps)."""

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


Call = BatchCall | SyncCall | JoinCall | RetireCall


@dataclass(frozen=True)
class RolloutPolicy:
    """The settings the rollout side follows (from rollout.*, sync.*, run.*)."""

    max_restarts: int
    sync_timeout_s: float
    startup_timeout_s: float
    asynchronous: bool = True
    restarts_rejoin: bool = True  # the weight transport takes a restarted worker back


@dataclass
class WorkerSet:
    """The live rollout workers, in index order (scaling appends and removes; indices shift down)."""

    handles: list
    names: list[str]
    awaiting: set[int] = field(default_factory=set)  # admitted or restarted, first weights on their way
    shards: list = field(default_factory=list)  # the last re-shard's PromptShards ([]: as built)

    def rejoined(self, i: int) -> None:
        """Worker i restarted: Ray re-ran its constructor with the shard it was built with; give it its
        current one (after a re-shard)."""
        if i < len(self.shards):
            self.handles[i].set_prompts.remote(self.shards[i])


def answer_or_death(ray: Any, fut: Any) -> tuple[Any, Exception | None]:
    """A worker call's answer, or the error that says its worker died (then the answer is None). An
    error inside a live worker (a task error: e.g. an actor it called, like the replay buffer, died)
    raises."""
    ex = ray.exceptions
    try:
        return ray.get(fut), None
    except ex.RayActorError as e:
        if isinstance(e, ex.RayTaskError):
            raise
        return None, e


class Inflight:
    def __init__(self, ray: Any):
        self.ray = ray
        self.calls: dict[Any, tuple[CallOwner, Call]] = {}
        self.failure: Exception | None = None  # a fatal answer that landed while the learners worked

    def __len__(self) -> int:
        return len(self.calls)

    def add(self, fut: Any, call: Call, owner: CallOwner) -> None:
        self.calls[fut] = (owner, call)

    def of(self, kind: type) -> list[tuple[Any, Any]]:
        """(future, call) of every call of `kind` in flight, oldest first."""
        return [(f, c) for f, (_, c) in self.calls.items() if isinstance(c, kind)]

    def pop(self, fut: Any) -> Call:
        """Forget one call (its answer is no longer wanted)."""
        return self.calls.pop(fut)[1]

    def drop(self, keep: Callable[[Call], bool]) -> list[Call]:
        """Forget the calls `keep` rejects (their answers are no longer wanted); returns them."""
        gone = [f for f, (_, c) in self.calls.items() if not keep(c)]
        return [self.calls.pop(f)[1] for f in gone]

    def replace(self, fut: Any, call: Call, owner: CallOwner | None = None) -> None:
        """The call behind `fut` is now `call` (e.g. its worker's index shifted)."""
        self.calls[fut] = (owner or self.calls[fut][0], call)

    def handle(self, fut: Any) -> None:
        """Hand one landed call to its owner."""
        owner, call = self.calls.pop(fut)
        owner.on_answer(fut, call)

    def check(self) -> None:
        """Raise the fatal answer kept while the learners worked (the loop calls this between steps)."""
        if self.failure is not None:
            err, self.failure = self.failure, None
            raise err

    def wait_for(self, futures: list, timeout_s: float | None = None) -> list:
        """Wait for `futures` (e.g. the learners'), handling the calls in flight meanwhile; return their
        results. A failed future raises as soon as it lands: when one learner rank dies, the others
        hang in their collective and would never finish. A call whose answer is fatal is kept in
        `failure` (no more calls are handled then) until `check`."""
        pending, results = list(futures), {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            watched = pending + ([] if self.failure else list(self.calls))
            ready, _ = self.ray.wait(watched, num_returns=1, timeout=left)
            if not ready:
                raise TimeoutError(f"{len(pending)} calls did not finish within {timeout_s}s")
            for f in ready:
                if f in pending:
                    pending.remove(f)
                    results[f] = self.ray.get(f)
                elif f in self.calls:
                    self._handle_while_waiting(f)
        return [results[f] for f in futures]

    def _handle_while_waiting(self, fut: Any) -> None:
        try:
            self.handle(fut)
        except Exception as e:  # the learners finish their call first; `check` raises it
            self.failure = e

    def wait_one(self, timeout_s: float, what: str) -> None:
        """Handle the next answer; raise when none comes within `timeout_s` (`what` says why the caller
        waited)."""
        self.check()
        if not self.calls:
            raise RuntimeError(f"{what}, but no rollout call is in flight")
        ready, _ = self.ray.wait(list(self.calls), num_returns=1, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"no rollout worker answered within {timeout_s}s while {what}")
        self.handle(ready[0])

    def poll(self, timeout_s: float) -> None:
        """Handle whatever answers land within `timeout_s` (none in flight: just wait)."""
        self.check()
        if not self.calls:
            time.sleep(timeout_s)
            return
        ready, _ = self.ray.wait(list(self.calls), num_returns=len(self.calls), timeout=timeout_s)
        for f in ready:
            if f in self.calls:
                self.handle(f)
