"""Fakes of the few Ray calls the driver's parts make (`wait`, `get`, `kill`, `exceptions`, actor
`method.remote(...)`, awaiting a ref), so their fault paths run in milliseconds without a cluster."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any


class RayError(Exception):
    pass


class RayActorError(RayError):
    def __init__(self, msg: str = "actor died", actor_id: str | None = None):
        super().__init__(msg)
        self.actor_id = actor_id


class RayTaskError(RayError):
    pass


class TaskErrorFromDeadActor(RayTaskError, RayActorError):
    """Ray raises a task error that is also an actor error when a task's callee died."""


class ActorUnavailableError(RayActorError):
    pass


class GetTimeoutError(RayError, TimeoutError):
    pass


class ObjectLostError(RayError):
    pass


class OwnerDiedError(ObjectLostError):
    pass


EXCEPTIONS = SimpleNamespace(
    RayError=RayError,
    RayActorError=RayActorError,
    RayTaskError=RayTaskError,
    ActorUnavailableError=ActorUnavailableError,
    GetTimeoutError=GetTimeoutError,
    ObjectLostError=ObjectLostError,
)

_ids = itertools.count()


class Fut:
    """A future: `value`, or `error` raised on get or await; `ready=False` never lands (a hang) until a
    test sets `ready = True`. Awaiting it always lets the other tasks run first, as a Ray ref does."""

    def __init__(self, value: Any = None, error: BaseException | None = None, ready: bool = True):
        self.value, self.error, self._ready = value, error, ready
        self._waiters: list[asyncio.Future] = []
        self.id = next(_ids)

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, ready: bool) -> None:
        self._ready = ready
        for w in self._waiters:
            if ready and not w.done():
                w.set_result(None)

    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        if not self._ready:
            w = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            yield from w.__await__()
        if self.error is not None:
            raise self.error
        return self.value

    def __hash__(self):
        return self.id

    def __repr__(self):
        return f"Fut#{self.id}({'ready' if self.ready else 'pending'})"


class FakeRay:
    exceptions = EXCEPTIONS

    def __init__(self):
        self.killed: list = []

    def wait(self, futs, num_returns=1, timeout=None):
        ready = sorted((f for f in futs if f.ready), key=lambda f: f.id)[:num_returns]  # oldest lands first
        return ready, [f for f in futs if f not in ready]

    def get(self, f, timeout=None):
        if isinstance(f, list):
            return [self.get(x, timeout) for x in f]
        if not f.ready:
            raise GetTimeoutError(f"{f} did not land within {timeout}s")
        if f.error is not None:
            raise f.error
        return f.value

    def kill(self, actor, no_restart=True):
        self.killed.append(actor)


class Method:
    """`actor.method.remote(*args)`: the next scripted answer (a Fut, a value, or a callable of the
    args), the last one repeating; every call is recorded (its args, and a dict of keywords if any)."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def remote(self, *args, **kwargs):
        self.calls.append((*args, kwargs) if kwargs else args)
        a = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(a) and not isinstance(a, Fut):
            a = a(*args)
        return a if isinstance(a, Fut) else Fut(a)


class FakeActor:
    def __init__(self, actor_id: str = "", **methods: Method):
        self._actor_id = SimpleNamespace(hex=lambda: actor_id)
        for k, m in methods.items():
            setattr(self, k, m)


# ---- the orchestrator's parts over these fakes ---------------------------------------------------


class FakeGroup:
    """The learners as the weights see them (`weight_sync.Publisher`): `resend(i)` and `publish(v)`
    answer from the given functions (default: nothing pending); every call is recorded."""

    def __init__(self, resend=None, publish=None):
        from sm_dist.sync.base import Delivery

        self.resent, self.connected = [], []
        self._resend = resend or (lambda i: Delivery(0))
        self._publish = publish or (lambda v: Delivery(v))

    async def resend(self, i):
        self.resent.append(i)
        return self._resend(i)

    async def publish(self, version):
        return self._publish(version)

    async def connect(self, workers, names):
        self.connected.append(list(names))


def rollouts_with(workers, policy=None, resend=None, publish=None):
    """`Rollouts` (with its `WeightSync`) over fake workers w0, w1, ...; its group is a `FakeGroup`."""
    from sm_dist.orchestrator.faults import RunState, WorkerRestarts
    from sm_dist.orchestrator.rollouts import Rollouts
    from sm_dist.orchestrator.tasks import RolloutPolicy, Tasks, WorkerSet
    from sm_dist.orchestrator.weight_sync import WeightSync

    ray, tasks = FakeRay(), Tasks()
    policy = policy or RolloutPolicy(max_restarts=1, sync_timeout_s=30.0, startup_timeout_s=5.0)
    ws = WorkerSet(list(workers), [f"w{i}" for i in range(len(workers))])
    restarts = WorkerRestarts(ray, ws, policy, pause_s=0.0)
    sync = WeightSync(ray, FakeGroup(resend, publish), tasks, ws, policy, RunState(), 1, restarts)
    return Rollouts(ray, tasks, ws, policy, sync, restarts)


def run(coro):
    """Run `coro` on a fresh event loop (the unit tests' stand-in for `Orchestrator.run`)."""
    return asyncio.run(coro)


async def settle(rounds: int = 500) -> None:
    """Let the tasks run until they wait on something that does not land by itself."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def in_flight(s) -> dict:
    """What `Rollouts` `s` has in flight: workers with a batch, and the weight confirmations to come."""
    return {"batches": sorted(s.busy), "syncs": [c.name for c in s.sync.pending()]}
