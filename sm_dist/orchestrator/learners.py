"""The learner side of the driver loop: the ranks as one group that steps, publishes its weights,
checkpoints, and is rebuilt from the latest checkpoint when a rank dies.

    group = LearnerGroup(ray, cfg, learners, build=build_learners_fn)
    metrics = await group.step(data_shards, replay_shards)
    delivery = await group.publish(version)   # rank 0's `Delivery` (sm_dist.sync.base)
    rank = group.dead_rank(err)               # which rank's death is behind `err`, or None
    step = await group.restart(rank, err, workers, names, at_step)

The ranks' calls are awaited on the driver's event loop, so the rollout workers' loops
(sm_dist/orchestrator/rollouts.py) go on while the learners work; the first rank's call that fails
raises at once. `dead_rank` still blocks (up to `probe_s`), on the failure path only. `ray` is the
module or a fake with its `wait`/`get`/`kill`/`exceptions`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sm_dist.learner import checkpoint as ckpt
from sm_dist.orchestrator.tasks import gather, within

log = logging.getLogger("sm_dist.driver")


class LearnerDied(RuntimeError):
    """A learner rank died and could not be replaced (learner.max_restarts used up, or a transport
    that cannot take new learners); the dead ranks cannot save, so the last checkpoint stands."""


class LearnerGroup:
    def __init__(self, ray: Any, cfg: Any, learners: list, build: Callable[[str], list]):
        """`build(model_dir)` makes a fresh set of ranks, process group joined
        (`sm_dist.orchestrator.actors.build_learners`, in the run's placement group)."""
        self.ray, self.cfg, self.learners = ray, cfg, list(learners)
        self.rendezvous: str | None = getattr(learners, "rendezvous", None)  # where the ranks met
        self.build = build
        self.restarts = 0
        self.busy_s = 0.0  # seconds the slowest rank spent in train_step, summed over steps

    async def step(self, data: list, replay: list) -> dict[str, float]:
        """One optimiser step on every rank (rank r gets `data[r]`, `replay[r]`); mean metrics."""
        futs = [lr.train_step.remote(d, r) for lr, d, r in zip(self.learners, data, replay, strict=True)]
        results = await gather(futs)
        self.busy_s += max(m["perf/learner_step_s"] for m in results)
        return {k: sum(m[k] for m in results) / len(results) for k in results[0]}

    async def connect(self, workers: list, names: list[str]) -> None:
        """Rank 0 connects its end of the weight transport to `workers` (every rank takes the call)."""
        await gather([lr.publish_weights.remote(workers=workers, names=names) for lr in self.learners])

    async def publish(self, version: int):
        """Every rank gathers (FSDP2), rank 0 sends `version`; its `Delivery`."""
        return (await gather([lr.publish_weights.remote(version) for lr in self.learners]))[0]

    async def resend(self, index: int):
        """Rank 0 sends the last version again to worker `index`; its `Delivery`."""
        t = self.cfg.sync.timeout_s
        late = f"rank 0's re-send of the weights did not finish within {t}s"
        return await within(self.learners[0].publish_weights.remote(only=index), t, late)

    async def load(self, ckpt_dir: str) -> None:
        await gather([lr.load.remote(ckpt_dir) for lr in self.learners])

    def save_futures(self, ckpt_dir: str) -> list:
        return [lr.save.remote(ckpt_dir) for lr in self.learners]

    def dead_rank(self, err: BaseException, probe_s: float = 10.0) -> int | None:
        """The rank of a dead learner behind `err`, or None. Either `err` reports a learner's death, or a
        call failed with an error (e.g. a learner's collective lost its peer), and then a rank whose
        process is gone is found by asking every rank for its step (a rank stuck in a collective does
        not answer within `probe_s` and counts as alive)."""
        ex = self.ray.exceptions
        ids = [lr._actor_id.hex() for lr in self.learners]
        if isinstance(err, ex.RayActorError) and not isinstance(err, ex.RayTaskError):
            return ids.index(err.actor_id) if err.actor_id in ids else None
        if not isinstance(err, ex.RayTaskError):
            return None
        from sm_dist.learner.calls import step  # a cheap call: a dead rank's fails

        futs = [lr.__ray_call__.remote(step) for lr in self.learners]
        ready, _ = self.ray.wait(futs, num_returns=len(futs), timeout=probe_s)
        for rank, f in enumerate(futs):
            if f in ready:
                try:
                    self.ray.get(f)
                except ex.RayActorError:
                    return rank
        return None

    async def restart(
        self, rank: int, err: BaseException, workers: list, names: list[str], at_step: int
    ) -> int:
        """Learner `rank` died: replace every rank (the survivors hang in their collective), load the
        latest checkpoint into the new ones (or start from the initial model), connect them to the
        workers, and return the step to go on from. Rollout workers, both buffers and their rows are
        untouched; replay rows written since the checkpoint came from weights the new learners never
        had, and age out through buffer.max_staleness like any stale rows."""
        from sm_dist.learner.calls import step as learner_step
        from sm_dist.orchestrator.actors import describe_error

        cfg = self.cfg
        self.restarts += 1
        n, most = self.restarts, cfg.learner.max_restarts
        why = describe_error(err)
        if n > most:
            raise LearnerDied(
                f"learner rank {rank} died; learner.max_restarts={most} restarts used up: {why}"
            ) from err
        if not cfg.sync.transport.survives_restarts:
            raise LearnerDied(
                f"learner rank {rank} died ({why}); new learners cannot rejoin the sync.transport="
                f"{cfg.sync.transport.kind} group. Resume the run (--resume), or use sync.transport.kind=object_store, "
                "which survives learner restarts"
            ) from err
        last = ckpt.latest_checkpoint(cfg.run.run_dir)
        src = f"checkpoint {last}" if last else f"the initial model {cfg.model.dir} (no checkpoint yet)"
        log.warning(f"learner rank {rank} died at step {at_step} ({why}); restart {n}/{most}: "
                    f"every rank restarts from {src}")  # fmt: skip
        for lr in self.learners:
            self.ray.kill(lr, no_restart=True)
        built = self.build(str(last / "model") if last else cfg.model.dir)
        self.learners, self.rendezvous = list(built), getattr(built, "rendezvous", None)
        await gather(
            [lr.__ray_call__.remote(learner_step) for lr in self.learners], cfg.run.startup_timeout_s
        )
        if last is None:
            step = 0
        else:
            await self.load(str(last))
            step = ckpt.read_run_state(last)["step"]
        await self.connect(workers, names)
        return step
