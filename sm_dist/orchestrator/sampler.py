"""The learner's batch: expert rows from the expert buffer and fresh rollouts from the replay buffer,
each split evenly over the learner ranks (DESIGN §3).

    sampler = BatchSampler(ray, cfg, replay, expert, rollouts)  # replay: the ReplayShards (buffer/shards.py)
    data, replay = await sampler.sample(ranks, step, version)

Rollout rows older than `buffer.max_staleness` versions are never sampled. After the BC warmup, with
`buffer.wait_for_replay`, the learner waits (`rollouts.next_batch`: until a batch lands) until enough
fresh rows exist, or a stop is asked for (`rollouts.stopping`); else a short replay half is filled
with data rows (`buffer.fill_with_data`). The buffers' own calls block the event loop (briefly).
Each rank gets the same number of rows of each source, so the DDP normalisation holds (learner.py).
Which replay shards a rank's rows come from (`buffer.shards`) is `ReplayShards.draw`'s rule.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from sm_dist.buffer.shards import deal


class FreshRows(Protocol):
    """The rollouts, as the sampler waits for them (`sm_dist.orchestrator.rollouts.Rollouts`)."""

    @property
    def stopping(self) -> bool: ...

    async def next_batch(self, timeout_s: float, what: str) -> None: ...


class BatchSampler:
    def __init__(self, ray: Any, cfg: Any, replay: Any, expert: Any, rollouts: FreshRows):
        """`rollouts`: what the learner waits on for fresh rows, and says when a stop was asked for."""
        self.ray, self.cfg, self.replay, self.expert = ray, cfg, replay, expert
        self.rollouts = rollouts
        self.wait_s = 0.0  # seconds the learner spent waiting for fresh rollouts
        self.staleness = 0.0  # mean versions behind of the last replay rows sampled

    async def sample(self, ranks: int, step: int, version: int) -> tuple[list, list]:
        """Per-rank (data, replay) Arrow batches for learner step `step` under weights `version`."""
        b = self.cfg.buffer
        n_rep, n_dat = self.cfg.split_batch()
        need = b.wait_for_replay and step >= self.cfg.objective.warmup_steps
        while True:
            rep = self.replay.draw(
                ranks, n_rep, min_version=version - b.max_staleness, newest_first=b.newest_first
            )
            got = min(r.num_rows for r in rep)  # rows each rank can have (the same for all)
            if got * ranks >= n_rep or not need or self.rollouts.stopping:
                break
            t0 = time.perf_counter()  # bounded staleness: the learner waits for fresh rollouts
            await self.rollouts.next_batch(
                self.cfg.sync.timeout_s,
                "the learner waited for fresh rows (buffer.wait_for_replay, sync.timeout_s)",
            )
            self.wait_s += time.perf_counter() - t0
        rep = [r.slice(0, got) for r in rep]
        self._note_staleness(rep, version)
        fill = n_rep - got * ranks if b.fill_with_data else 0
        dat = self.ray.get(self.expert.sample.remote(n_dat + fill))
        dat = dat.slice(0, (dat.num_rows // ranks) * ranks)
        return [deal(dat, r, ranks) for r in range(ranks)], rep

    def _note_staleness(self, rep: list, version: int) -> None:
        """Mean versions behind `version` of the replay rows used this step (kept when none are)."""
        import pyarrow.compute as pc

        pv = [r.column("policy_version") for r in rep if r.num_rows and "policy_version" in r.schema.names]
        if pv:
            total = sum(pc.sum(c).as_py() for c in pv)
            self.staleness = version - total / sum(len(c) for c in pv)
