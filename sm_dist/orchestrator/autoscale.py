"""The autoscaler (`rollout.max_workers`): the rollout workers follow the learner's wait for rollouts.
`autoscaler(cfg, pool)` builds it (None when rollout.max_workers is null); the driver awaits `tick`
between steps, and it scales through `WorkerPool.scale_to` (sm_dist/orchestrator/scaling.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sm_dist.orchestrator.scaling import ScalingRefused, WorkerPool

log = logging.getLogger("sm_dist.driver")


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

    async def tick(self, wait_s_total: float, buffer_fill: float) -> int | None:
        """Between steps: the new worker count when the policy changed it, else None."""
        now = self.clock()
        if self.pool.pending_joins():
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
        n = len(self.pool.ws.handles)
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
        await self.pool.scale_to(n + vote)
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
