"""Live scaling of the rollout workers: add some or remove some while the learners train.

    pool = WorkerPool(ray, cfg, sched, tasks, prompts, targets, model_dir, replay, expert)
    await pool.scale_to(3)  # starts the missing workers (their constructors run in the background)
    await pool.admit()      # between two learner steps: the ready ones join (weights, then batches)
    await pool.scale_to(1)  # not-yet-joined workers are cancelled first, then the newest live ones leave

An added worker's constructor call is awaited by a task of its own (sm_dist/orchestrator/tasks.py);
once it answered, the worker joins at the next step boundary: into the live `WorkerSet`, the learner's
sender reconnected to the new list, the latest version re-sent (`WeightSync.give`), and its own loop
started (rollouts.py), whose first batch goes out once that version is applied. A removed worker with
a batch in flight is retiring (`Rollouts.retire`): its loop lets the batch land (its rows were
acknowledged by the buffer before the batch returned), counts it, and kills it; none of its rows are
lost or written twice; one that has not landed within sync.timeout_s is abandoned. Nothing here waits
for a worker to start: the learner never waits on scaling. After every change of the live set the prompts are re-sharded over it
(`RolloutWorker.set_prompts`); a worker that Ray restarts later is given its current shard again
(`WorkerSet.rejoined`).

Only the object-store transport scales: a collective transport's group is fixed when it forms.
The autoscaler (rollout.max_workers) is sm_dist/orchestrator/autoscale.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sm_dist.orchestrator.actors import describe_error, make_worker, shard, worker_class
from sm_dist.orchestrator.rollouts import Rollouts
from sm_dist.orchestrator.tasks import Tasks

log = logging.getLogger("sm_dist.driver")


class ScalingRefused(ValueError):
    """A scaling request that cannot be carried out (its message says why and what to do)."""


class WorkerPool:
    def __init__(self, ray: Any, cfg: Any, sched: Rollouts, tasks: Tasks, prompts: list, targets: list | None,
                 model_dir: str, replay: Any, expert: Any, fixed_size: bool = False):  # fmt: skip
        """`fixed_size`: a local Ray (started by this driver) never gains nodes: scale within it."""
        self.ray, self.cfg, self.sched, self.tasks, self.ws = ray, cfg, sched, tasks, sched.ws
        self.prompts, self.targets, self.model_dir = prompts, targets, model_dir
        self.replay, self.expert, self.fixed_size = replay, expert, fixed_size
        self.next_id = len(self.ws.names)  # worker names are never reused: w0, w1, ... in order of creation
        self.built: dict[str, Any] = {}  # name -> the PromptShard it was built with (a restart re-reads it)
        self.starting: dict[str, tuple[asyncio.Task, Any]] = {}  # name -> (its start-up, its handle)
        self.joined: list[tuple[Any, str]] = []  # started workers ready, waiting for `admit`
        self.shard_calls: dict[Any, str] = {}  # the last re-shard's set_prompts calls, until checked
        self._W = None

    # ---- sizes
    def _most_workers(self) -> int:
        """How many workers the cluster's total resources hold beside the learners (today's nodes)."""
        r, lc = self.cfg.rollout, self.cfg.learner
        total = getattr(self.ray, "cluster_resources", dict)()
        most = len(self.prompts)
        for res, per, learners in (("CPU", r.cpus_per_worker, lc.cpus_per_learner),
                                   ("GPU", r.gpus_per_worker, lc.gpus_per_learner)):  # fmt: skip
            if per:
                most = min(most, int((total.get(res, 0.0) - lc.num_learners * learners) / per + 1e-9))
        return max(most, 1)

    def _size(self) -> int:
        """Live workers plus the ones starting."""
        return len(self.ws.handles) + self.pending_joins()

    def pending_joins(self) -> int:
        """Added workers not admitted yet (starting, or ready and waiting for `admit`)."""
        return len(self.joined) + len(self.starting)

    def counts(self, target: int | None = None) -> dict:
        live = len(self.ws.handles)
        return {"workers": live, "joining": self.pending_joins(), "target": target or live,
                "names": list(self.ws.names)}  # fmt: skip

    def check(self, n: int) -> None:
        t = self.cfg.sync.transport
        if t.collective:
            raise ScalingRefused(
                f"sync.transport={t.kind} cannot add or remove rollout workers while the run goes on (its "
                "group is formed once, at start). Use sync.transport.kind=object_store, or stop the run and "
                "--resume it with a new rollout.num_workers"
            )
        if not 1 <= n <= len(self.prompts):
            raise ScalingRefused(
                f"workers must be between 1 and the number of prompts ({len(self.prompts)}), got {n}"
            )
        if self.fixed_size and n > (most := self._most_workers()):
            raise ScalingRefused(
                f"this run's local Ray cannot grow: it holds at most {most} rollout workers beside the "
                f"learners (rollout.cpus_per_worker={self.cfg.rollout.cpus_per_worker}), got {n}. Scale to "
                f"{most} or fewer, or run on a cluster (--address) whose autoscaler adds nodes"
            )

    # ---- scaling
    async def scale_to(self, n: int) -> dict:
        """Start or remove workers so that `n` are live or starting; returns `counts()`."""
        self.check(n)
        cur = self._size()
        if n > cur:
            self._start(n - cur, n)
        elif n < cur:
            k = cur - n
            k -= self.cancel_joins(k)
            for _ in range(k):
                name = await self.remove_worker(len(self.ws.handles) - 1)
                self.built.pop(name, None)
            if k:
                self.reshard()
        return self.counts(target=n)

    def _start(self, k: int, n: int) -> None:
        if self._W is None:
            self._W = worker_class(self.ray, self.cfg)
        names, base = [], self._size()
        for j in range(k):
            name, seed = f"w{self.next_id}", self.cfg.run.seed + self.next_id
            self.next_id += 1
            sh = self.built[name] = shard(self.ray, self.cfg, self.prompts, self.targets, (base + j) % n, n)
            h = make_worker(self._W, self.cfg, name, self.model_dir, sh, self.replay, self.expert, seed)
            self.starting[name] = (self.tasks.spawn(self._join(h, name)), h)
            names.append(name)
        shown = names if len(names) <= 4 else f"{names[0]} .. {names[-1]} ({len(names)})"
        log.info(f"starting rollout workers {shown} (scaling to {n})")
        r = self.cfg.rollout
        free = getattr(self.ray, "available_resources", dict)()
        for res, per in (("CPU", r.cpus_per_worker), ("GPU", r.gpus_per_worker)):
            if per and k * per > free.get(res, 0.0):
                log.warning(f"{shown} need {k * per:g} {res}s, the cluster has {free.get(res, 0.0):g} free: they "
                            "start when resources appear (an autoscaler adds nodes for them; else scale down)")  # fmt: skip

    def cancel_joins(self, most: int | None = None) -> int:
        """Kill up to `most` (None: all) added workers not admitted yet, the latest first; how many."""
        starting = [(n, h) for n, (_, h) in self.starting.items()]
        victims = (starting[::-1] + [(None, h) for h, _ in self.joined[::-1]])[:most]
        for name, h in victims:
            if name is None:
                self.joined = [(jh, n) for jh, n in self.joined if jh is not h]
            else:
                self.starting.pop(name)[0].cancel()
            self.ray.kill(h, no_restart=True)
        return len(victims)

    async def _join(self, handle: Any, name: str) -> None:
        """An added worker's start-up: ready, it waits for `admit`; failed, it is dropped."""
        try:
            await handle.version.remote()
        except self.ray.exceptions.RayError as e:
            self.starting.pop(name, None)
            log.warning(f"rollout worker {name} failed to start ({describe_error(e)}); dropped")
            self.ray.kill(handle, no_restart=True)
            return
        self.starting.pop(name, None)
        self.joined.append((handle, name))

    async def admit(self) -> list[int]:
        """Between two learner steps: the started workers that are ready join (into the live set, the
        learner's sender reconnected, the latest weights re-sent, their first batch once applied) and
        the prompts are re-sharded; removed workers whose last batch is late are abandoned. Returns the
        indices of those who joined."""
        self._check_shards()
        self.sched.check_retiring()
        if not self.joined:
            return []
        new = [n for _, n in self.joined]
        for h, n in self.joined:
            self.ws.handles.append(h)
            self.ws.names.append(n)
        self.joined = []
        await self.sched.sync.reconnect()
        for n in new:
            if v := await self.sched.sync.give(n):
                log.info(f"rollout worker {n} joins with weights version {v}")
        log.info(f"rollout workers {new} joined; {len(self.ws.handles)} now")
        self.reshard()  # before their first batch: both calls come from this process
        for n in new:
            self.sched.add(n)
        return [self.ws.index(n) for n in new]

    async def remove_worker(self, i: int) -> str:
        """Take worker `i` out; returns its name. With a batch in flight it retires (`Rollouts.retire`);
        with none it is killed now. The indices above `i` shift down by one, and the learner's sender
        is reconnected."""
        if len(self.ws.handles) <= 1:
            raise ValueError("cannot remove the last rollout worker")
        h, name = self.ws.handles.pop(i), self.ws.names.pop(i)
        self.sched.restarts.forget(name)
        self.sched.sync.forget(name)  # a weight confirmation it no longer needs
        self.ws.awaiting.discard(name)
        retiring = self.sched.retire(name, h)
        await self.sched.sync.reconnect()
        log.info(
            f"rollout worker {name} removed{' once its batch lands' if retiring else ''}; {len(self.ws.handles)} left"
        )
        return name

    # ---- prompt shards
    def reshard(self) -> None:
        """Every live worker gets every n-th prompt from its index (ordered before its next batch: both
        calls come from this process)."""
        n = len(self.ws.handles)
        self.ws.shards = [shard(self.ray, self.cfg, self.prompts, self.targets, i, n) for i in range(n)]
        self._check_shards()
        self.shard_calls = {w.set_prompts.remote(sh): name for w, sh, name in
                            zip(self.ws.handles, self.ws.shards, self.ws.names, strict=True)}  # fmt: skip

    def _check_shards(self) -> None:
        """Report a failed `set_prompts` of the last re-shard (the worker keeps its previous shard)."""
        if not self.shard_calls:
            return
        ready, _ = self.ray.wait(list(self.shard_calls), num_returns=len(self.shard_calls), timeout=0)
        for f in ready:
            name = self.shard_calls.pop(f)
            try:
                self.ray.get(f)
            except Exception as e:
                log.warning(
                    f"rollout worker {name}: its new prompt shard was not taken ({e}); it keeps its last"
                )
