"""The run's tasks on the driver's one event loop, and what they share: the live rollout workers
(`WorkerSet`), the settings they follow (`RolloutPolicy`), and `Tasks`, which starts them and keeps
the first fatal error one of them raised.

    tasks = Tasks()
    tasks.spawn(worker_loop("w0"))     # runs beside the learner loop, on the same thread
    await tasks.until(lambda: ready)    # wakes whenever a task says something changed (`tasks.changed()`)
    tasks.check()                       # between two learner steps: a fatal error a task raised meanwhile

Only the driver's thread runs them (`Orchestrator.run`), so the tasks share state without locks. A fatal
error (a worker dead once too often, a wrong weight version, the replay buffer gone) ends the task that
met it and is kept here until the learner loop calls `check` between two steps, so the step in flight
is counted, logged and checkpointed like any other: a rescue checkpoint holds the step the metrics last
show. A few calls still block the loop, and so hold the tasks up while they run: the buffers' own calls
(the sampler's draws, the control snapshot's stats), the data.watch_dir poll, and `dead_rank`'s probe
on a learner failure; the held-out accuracy and the rescue checkpoint run with the loop stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any


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
    """The live rollout workers, in index order (scaling appends and removes; indices shift down). A
    worker is known by its name (never reused); its index is where the weights' sender has it."""

    handles: list
    names: list[str]
    awaiting: set[str] = field(default_factory=set)  # joined or restarted, first weights on their way
    shards: list = field(default_factory=list)  # the last re-shard's PromptShards ([]: as built)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def handle(self, name: str) -> Any:
        return self.handles[self.names.index(name)]

    def rejoined(self, name: str) -> None:
        """Worker `name` restarted: Ray re-ran its constructor with the shard it was built with; give it
        its current one (after a re-shard)."""
        i = self.index(name)
        if i < len(self.shards):
            self.handles[i].set_prompts.remote(self.shards[i])


def is_death(ray: Any, err: BaseException) -> bool:
    """Does `err` say a worker's process is gone (not an error inside a live one, e.g. an actor it called,
    like the replay buffer, died: that is fatal)?"""
    ex = ray.exceptions
    return isinstance(err, ex.RayActorError) and not isinstance(err, ex.RayTaskError)


class Tasks:
    def __init__(self):
        self.failure: BaseException | None = None  # the first fatal error a task raised
        self._changed: asyncio.Future | None = None

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run `coro` beside the learner loop; an error it raises is kept for `check`."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._keep)
        return task

    def _keep(self, task: asyncio.Task) -> None:
        if task.cancelled() or (err := task.exception()) is None:
            return
        if self.failure is None:  # the learner loop raises it between two steps (`check`)
            self.failure = err
        self.changed()

    def check(self) -> None:
        """Raise the fatal error a task met (the learner loop calls this between steps)."""
        if self.failure is not None:
            err, self.failure = self.failure, None
            raise err

    def changed(self) -> None:
        """Wake every task in `until`: what it waits for may hold now."""
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def until(self, ready: Callable[[], Any]) -> None:
        """Wait until `ready()` holds (checked again whenever `changed` is called)."""
        while not ready():
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)


async def within(aw: Any, timeout_s: float | None, late: str) -> Any:
    """`aw` awaited for at most `timeout_s`; past it, a TimeoutError whose message is `late`."""
    try:
        return await asyncio.wait_for(aw, timeout_s)
    except TimeoutError:
        raise TimeoutError(late) from None


async def gather(refs: list, timeout_s: float | None = None) -> list:
    """The results of `refs` (Ray refs, or anything awaitable); the first that fails raises at once (when
    one learner rank dies, the others hang in their collective and would never finish)."""
    if timeout_s is None:
        return list(await asyncio.gather(*refs))
    return list(
        await within(
            asyncio.gather(*refs), timeout_s, f"{len(refs)} calls did not finish within {timeout_s}s"
        )
    )
