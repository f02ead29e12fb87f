"""Live scaling of the rollout workers: add some or remove some while the learners train.

    pool = WorkerPool(ray, cfg, sched, prompts, targets, model_dir, replay, expert)
    pool.scale_to(3)      # starts the missing workers (their constructors run in the background)
    pool.admit()          # between two learner steps: the ready ones join (weights first, then batches)
    pool.scale_to(1)      # not-yet-joined workers are cancelled first, then the newest live ones leave

The bookkeeping is the scheduler's (`RolloutScheduler.add_workers` / `admit_joined` / `remove_worker`):
an added worker joins once its constructor answered, the learner's sender is reconnected to the new
list and re-sends the latest version, and the worker's first batch goes out once that version is
applied. A removed worker's in-flight batch lands (its rows were acknowledged by the buffer before the
batch returned) and then the worker is killed; none of its rows are lost or written twice. Nothing
here waits for a worker to start: the learner never waits on scaling. After every change of the live
set the prompts are re-sharded over it (`RolloutWorker.set_prompts`).

Only the object-store transport scales: a collective transport's group is fixed when it forms.
A worker that Ray restarts after a re-shard is given its current shard again (its constructor re-read
the one it was built with).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sm_dist.orchestrator.actors import make_worker, shard, worker_class

log = logging.getLogger("sm_dist.driver")


class ScalingRefused(ValueError):
    """A scaling request that cannot be carried out (its message says why and what to do)."""


class WorkerPool:
    def __init__(self, ray: Any, cfg: Any, sched: Any, prompts: list, targets: list | None, model_dir: str,
                 replay: Any, expert: Any):  # fmt: skip
        self.ray, self.cfg, self.sched = ray, cfg, sched
        self.prompts, self.targets, self.model_dir = prompts, targets, model_dir
        self.replay, self.expert = replay, expert
        self.next_id = len(sched.names)  # worker names are never reused: w0, w1, ... in order of creation
        self.built: dict[str, Any] = {}  # name -> the PromptShard it was built with (a restart re-reads it)
        self.current: list = []  # the last re-shard's PromptShards (refs alive until they are read)
        self._W = None
        self.fixed_size = False  # a local Ray (started by this driver) never gains nodes: scale within it
        sched.rejoined = self._rejoined
        self.shard_calls: dict[Any, str] = {}  # the last re-shard's set_prompts calls, until checked

    def most_workers(self) -> int:
        """How many workers the cluster's total resources hold beside the learners (today's nodes)."""
        r, lc = self.cfg.rollout, self.cfg.learner
        total = getattr(self.ray, "cluster_resources", dict)()
        most = len(self.prompts)
        for res, per, learners in (("CPU", r.cpus_per_worker, lc.cpus_per_learner),
                                   ("GPU", r.gpus_per_worker, lc.gpus_per_learner)):  # fmt: skip
            if per:
                most = min(most, int((total.get(res, 0.0) - lc.num_learners * learners) / per + 1e-9))
        return max(most, 1)

    def size(self) -> int:
        """Live workers plus the ones starting."""
        return len(self.sched.workers) + self.sched.pending_joins()

    def check(self, n: int) -> None:
        t = self.cfg.sync.transport
        if t.collective:
            raise ScalingRefused(
                f"sync.transport={t.kind} cannot add or remove rollout workers while the run goes on (its "
                "group is formed once, at start). Use sync.transport=object_store, or stop the run and "
                "--resume it with a new rollout.num_workers"
            )
        if not 1 <= n <= len(self.prompts):
            raise ScalingRefused(
                f"workers must be between 1 and the number of prompts ({len(self.prompts)}), got {n}"
            )
        if self.fixed_size and n > (most := self.most_workers()):
            raise ScalingRefused(
                f"this run's local Ray cannot grow: it holds at most {most} rollout workers beside the "
                f"learners (rollout.cpus_per_worker={self.cfg.rollout.cpus_per_worker}), got {n}. Scale to "
                f"{most} or fewer, or run on a cluster (--address) whose autoscaler adds nodes"
            )

    def scale_to(self, n: int) -> dict:
        """Start or remove workers so that `n` are live or starting; returns `counts()`."""
        self.check(n)
        cur = self.size()
        if n > cur:
            self._add(n - cur, n)
        elif n < cur:
            k = cur - n
            k -= self.sched.cancel_joins(k)
            for _ in range(k):
                name = self.sched.remove_worker(len(self.sched.workers) - 1)
                self.built.pop(name, None)
            if k:
                self.reshard()
        return self.counts(target=n)

    def counts(self, target: int | None = None) -> dict:
        live = len(self.sched.workers)
        return {"workers": live, "joining": self.sched.pending_joins(), "target": target or live,
                "names": list(self.sched.names)}  # fmt: skip

    def _add(self, k: int, n: int) -> None:
        if self._W is None:
            self._W = worker_class(self.ray, self.cfg)
        handles, names, base = [], [], self.size()
        for j in range(k):
            name, seed = f"w{self.next_id}", self.cfg.run.seed + self.next_id
            self.next_id += 1
            sh = shard(self.ray, self.cfg, self.prompts, self.targets, (base + j) % n, n)
            self.built[name] = sh
            handles.append(
                make_worker(self._W, self.cfg, name, self.model_dir, sh, self.replay, self.expert, seed)
            )
            names.append(name)
        self.sched.add_workers(handles, names)
        shown = names if len(names) <= 4 else f"{names[0]} .. {names[-1]} ({len(names)})"
        log.info(f"starting rollout workers {shown} (scaling to {n})")
        r = self.cfg.rollout
        free = getattr(self.ray, "available_resources", dict)()
        for res, per in (("CPU", r.cpus_per_worker), ("GPU", r.gpus_per_worker)):
            if per and k * per > free.get(res, 0.0):
                log.warning(f"{shown} need {k * per:g} {res}s, the cluster has {free.get(res, 0.0):g} free: they "
                            "start when resources appear (an autoscaler adds nodes for them; else scale down)")  # fmt: skip

    def admit(self) -> list[int]:
        """Between two learner steps: the started workers that are ready join; re-shard if any did."""
        self.check_shards()
        new = self.sched.admit_joined()
        if new:
            self.reshard()
        return new

    def _rejoined(self, i: int) -> None:
        """Worker i restarted: Ray re-ran its constructor with the shard it was built with; give it its
        current one (after a re-shard)."""
        if i < len(self.current):
            self.sched.workers[i].set_prompts.remote(self.current[i])

    def reshard(self) -> None:
        """Every live worker gets every n-th prompt from its index (ordered before its next batch: both
        calls come from this process)."""
        n = len(self.sched.workers)
        self.current = [shard(self.ray, self.cfg, self.prompts, self.targets, i, n) for i in range(n)]
        self.check_shards()
        self.shard_calls = {w.set_prompts.remote(sh): name for w, sh, name in
                            zip(self.sched.workers, self.current, self.sched.names, strict=True)}  # fmt: skip

    def check_shards(self) -> None:
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


class Autoscaler:
    """`rollout.max_workers`: one worker more when the learner waited for rollouts more than `up_wait` of
    a window, one fewer when it waited less than `down_wait` and the replay buffer is at least half full.
    Hysteresis: the two thresholds are apart, a decision must repeat two windows in a row, and no
    decision is taken while workers are starting (a change is judged on the windows after it)."""

    def __init__(self, pool: WorkerPool, min_workers: int, max_workers: int, window_s: float, up_wait: float,
                 down_wait: float, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.pool, self.lo, self.hi = pool, min_workers, max_workers
        self.window_s, self.up, self.down, self.clock = window_s, up_wait, down_wait, clock
        self._start: tuple[float, float] | None = None  # (time, learner wait seconds) at the window's start
        self._last_vote = 0
        self.changes: list[tuple[int, int]] = []  # (from, to)

    def tick(self, wait_s_total: float, buffer_fill: float) -> int | None:
        """Between steps: the new worker count when the policy changed it, else None."""
        now = self.clock()
        if self.pool.sched.pending_joins():
            self._start, self._last_vote = None, 0  # judged after the new workers joined
            return None
        if self._start is None:
            self._start = (now, wait_s_total)
            return None
        t0, w0 = self._start
        if now - t0 < self.window_s:
            return None
        frac = (wait_s_total - w0) / (now - t0)
        self._start = (now, wait_s_total)
        n = len(self.pool.sched.workers)
        vote = (
            1
            if frac > self.up and n < self.hi
            else -1
            if frac < self.down and buffer_fill >= 0.5 and n > self.lo
            else 0
        )
        if vote == 0 or vote != self._last_vote:
            self._last_vote = vote
            return None
        self._last_vote = 0
        self.pool.scale_to(n + vote)
        self.changes.append((n, n + vote))
        log.info(f"autoscaling: the learner waited {100 * frac:.0f}% of the last {self.window_s:g}s, replay buffer "
                 f"{100 * buffer_fill:.0f}% full: {n} -> {n + vote} rollout workers")  # fmt: skip
        return n + vote


def autoscaler(cfg: Any, pool: WorkerPool) -> Autoscaler | None:
    """The run's `Autoscaler`, or None when rollout.max_workers is null."""
    r = cfg.rollout
    if r.max_workers is None:
        return None
    try:
        pool.check(r.max_workers)
    except ScalingRefused as e:
        from sm_dist.config import ConfigError

        raise ConfigError("rollout.max_workers", f"{e}.") from None
    return Autoscaler(pool, r.min_workers, r.max_workers, r.autoscale_window_s, r.autoscale_up_wait,
                      r.autoscale_down_wait)  # fmt: skip
