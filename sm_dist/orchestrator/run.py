"""One run's parts, built together from its actors (`Orchestrator`); the learner loop that drives them
is `learn` in sm_dist/orchestrator/driver.py.

    tasks = Tasks()                              the tasks beside the learner loop, their fatal error
    group = LearnerGroup(...)                    the learner ranks: step, publish, checkpoint, rebuild
    sync = WeightSync(..., group, tasks, ...)    publish, confirmations, re-sends, deadline
    sched = Rollouts(..., tasks, ..., sync, ...) a self-driving loop per rollout worker
    pool = WorkerPool(..., sched, tasks)         live scaling; `autoscaler` (rollout.max_workers)
    sampler = BatchSampler(..., sched)           each step's data and replay halves
    ckpt = Checkpointer(..., group, ...)         checkpoints, the rescue checkpoint
    control = Controller(run_dir, self)          the control API's calls, applied between steps

Every part gets what it needs when it is built; none is rewired later. All of them run on one event
loop, the `Orchestrator`'s, on the driver's thread: `o.run(coro)` drives it (the learner loop,
`await`ing its parts; set-up and the end between). The `Orchestrator` is what the control API acts on
(`sm_dist.orchestrator.control.Controllable`) and what a signal stops (`faults.Stoppable`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sm_dist.config import Config
from sm_dist.orchestrator.actors import build_learners
from sm_dist.orchestrator.autoscale import autoscaler
from sm_dist.orchestrator.control import Controller, RunView
from sm_dist.orchestrator.faults import Checkpointer, RunState, WorkerRestarts
from sm_dist.orchestrator.learners import LearnerGroup
from sm_dist.orchestrator.rollouts import Rollouts
from sm_dist.orchestrator.sampler import BatchSampler
from sm_dist.orchestrator.scaling import WorkerPool
from sm_dist.orchestrator.tasks import RolloutPolicy, Tasks, WorkerSet
from sm_dist.orchestrator.weight_sync import WeightSync

log = logging.getLogger("sm_dist.driver")
T = TypeVar("T")


@dataclass
class RunActors:
    """What the rollout workers are built from, and the actors `sm_dist.orchestrator.actors.build_actors`
    started (filled in by the driver's `_start`)."""

    prompts: list
    targets: list | None
    local_ray: bool = False  # started by this driver: it never gains nodes
    model_dir: str = ""
    replay: Any = None  # the ReplayShards (sm_dist/buffer/shards.py)
    expert: Any = None  # the expert ReplayBuffer actor
    workers: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    learners: list = field(default_factory=list)
    pg: Any = None  # the learners' placement group: restarts reuse it
    prompt_refs: Any = None  # the prompt shards' refs, held while the workers live (a restart re-reads them)


def rollout_policy(cfg: Config) -> RolloutPolicy:
    return RolloutPolicy(
        max_restarts=cfg.rollout.max_restarts, sync_timeout_s=cfg.sync.timeout_s,
        startup_timeout_s=cfg.run.startup_timeout_s, asynchronous=cfg.run.asynchronous,
        restarts_rejoin=cfg.sync.transport.survives_restarts,
    )  # fmt: skip


class Orchestrator:
    def __init__(
        self, ray: Any, cfg: Config, a: RunActors, state: RunState, logger: Any, watcher: Any = None
    ):
        """`watcher`: the data.watch_dir `DataWatcher` (sm_dist/data/watch.py), or None."""
        self.ray, self.cfg, self.s, self.log, self.watcher = ray, cfg, state, logger, watcher
        self.replay, self.expert = a.replay, a.expert
        self.loop, self.tasks = asyncio.new_event_loop(), Tasks()
        policy, ws = rollout_policy(cfg), WorkerSet(a.workers, a.names)
        self.group = LearnerGroup(ray, cfg, a.learners, lambda d: build_learners(ray, cfg, d, a.pg))
        restarts = WorkerRestarts(ray, ws, policy)
        self.sync = WeightSync(ray, self.group, self.tasks, ws, policy, state, cfg.sync.every, restarts)
        self.sched = Rollouts(ray, self.tasks, ws, policy, self.sync, restarts, state.rollout_batches)
        self.pool = WorkerPool(ray, cfg, self.sched, self.tasks, a.prompts, a.targets, a.model_dir, a.replay,
                               a.expert, fixed_size=a.local_ray)  # fmt: skip
        self.autoscaler = autoscaler(cfg, self.pool)
        self.sampler = BatchSampler(ray, cfg, a.replay, a.expert, self.sched)
        r = cfg.run
        self.ckpt = Checkpointer(ray, r.run_dir, r.keep_last, cfg.sync.timeout_s, self.group, a.replay)
        self.control = Controller(r.run_dir, self)
        self.t_start = time.perf_counter()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Drive the run's event loop until `coro` is done (tasks it started keep their place for the next
        call: a confirmation awaited at the start is still awaited by the learner loop)."""
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        """Cancel the tasks left (a failed loop's) and close the event loop."""
        if left := asyncio.all_tasks(self.loop):
            for t in left:
                t.cancel()
            self.loop.run_until_complete(asyncio.wait(left))
        self.loop.close()

    @property
    def stopping(self) -> bool:
        return self.sched.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.sched.stopping = value

    def state(self) -> RunState:
        """The run state as a checkpoint records it."""
        self.s.rollout_batches = self.sched.batches
        return self.s

    @property
    def workers(self) -> list:
        """The live rollout workers' actor handles."""
        return self.sched.workers

    def settle_weights(self) -> None:
        """Publish the final weights if the last step did not, and wait until every worker applied them."""
        versions = self.ray.get([w.version.remote() for w in self.workers])
        if any(v != self.s.version for v in versions):
            self.run(self._settle())

    async def _settle(self) -> None:
        await self.sync.publish()
        await self.sync.settle()
        self.tasks.check()

    async def restart_learners(self, rank: int, err: BaseException) -> None:
        """Learner `rank` died: the group is rebuilt from the latest checkpoint and its weights are
        re-published under a new version (weight_sync.py, rule 1)."""
        self.sync.drop()
        ws = self.sched.ws
        self.s.step = await self.group.restart(rank, err, ws.handles, ws.names, self.s.step)
        await self.sync.publish()
        log.info(f"learners restarted at step {self.s.step}, weights version {self.s.version}")

    def metrics(self, learner_m: dict, extra: dict) -> dict[str, float]:
        wall = time.perf_counter() - self.t_start
        out = {**learner_m, **extra, **self.sched.take_stats()}
        out["run/learner_restarts"] = float(self.group.restarts)
        out["perf/learner_busy"] = self.group.busy_s / wall
        out["perf/rollout_busy"] = self.sched.gen_s / wall / len(self.sched.workers)
        out["perf/learner_wait_s_total"] = self.sampler.wait_s
        out["buffer/staleness_mean"] = self.sampler.staleness
        out["rollout/workers"] = float(len(self.sched.workers))
        return out

    # ---- the control API's side (sm_dist.orchestrator.control.Controllable)
    async def scale(self, n: int) -> dict:
        return await self.pool.scale_to(n)

    @property
    def paused(self) -> bool:
        return self.sched.paused

    def pause(self, paused: bool) -> None:
        self.sched.pause(paused)

    def stop(self) -> None:
        self.sched.stopping = True

    async def checkpoint(self) -> dict:
        return {"checkpoint": str(await self.ckpt.save(self.state())), "step": self.s.step}

    async def between_steps(self, buffers: dict) -> None:
        await self.pool.admit()
        if self.autoscaler is not None:
            fill = ((buffers or {}).get("replay") or {}).get("rows", 0) / self.cfg.buffer.capacity_rows
            try:
                await self.autoscaler.tick(self.sampler.wait_s, fill)
            except ValueError as e:  # e.g. a refused size: reported, the run goes on
                log.warning(f"autoscaling: {e}")
        if self.watcher is not None:
            # data.watch_dir (sm_dist/data/watch.py): its new files' rows
            self.s.expert_rows += self.watcher.poll(step=self.s.step)

    async def poll(self, timeout_s: float) -> None:
        self.tasks.check()
        await asyncio.sleep(timeout_s)

    def view(self) -> RunView:
        return RunView(self.s.step, self.s.version, self.cfg.run.total_steps, list(self.sched.ws.names),
                       self.pool.pending_joins())  # fmt: skip

    def buffer_stats(self) -> dict:
        return {
            "replay": self.replay.stats(timeout=10),
            "expert": self.ray.get(self.expert.stats.remote(), timeout=10),
        }
