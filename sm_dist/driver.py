"""The driver (`sm-dist train`): builds the actors and runs the asynchronous actor/learner loop.

    expert rows ──► expert buffer ─┐
    RolloutWorker×N ──► replay buffer ─┴─► sample ½ data ½ replay ─► Learner×M ─► weights (version v)
          ▲                                                                            │
          └──────────────── update_weights([ref], v) between two run_batch calls ─────┘

Set-up, then one loop. Every worker always has one `run_batch` (or `update_weights`) in flight; while
the learners step, the driver `ray.wait`s on learner and worker futures together, resubmitting each
worker's next batch as soon as its last one lands. Weights are published every `sync.every` steps: rank
0's `state_dict_blob` result stays in the object store and each worker gets its reference; because
actor calls run in submission order, the update lands between two batches, never inside one.

With `sync.transport=gloo|nccl` the publish is a collective instead: learner rank 0 broadcasts, each
(threaded) worker takes its engine lock after its current batch, receives, and resumes; the driver keeps
handling batch completions while it waits.

Deliberate choices: expert rows live in their own `ReplayBuffer` actor (`<run_dir>/expert/buffer`) and
rollouts in the replay buffer (`<run_dir>/buffer`), so "½ data ½ replay" is two samples, not a filter.
Until the replay buffer has enough fresh rows, the batch is filled with data rows (an even number per
learner rank, so the DDP equivalence of learner.py holds).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from sm_dist.actors import (
    build_actors,
    build_learners,
    check_resources,
    connect_weight_transfer,
    describe_error,
    start_ray,
    wait_ready,
)
from sm_dist.config import Config, ConfigError
from sm_dist.config_load import dump_config
from sm_dist.data.prepare import build_data, prepare_model
from sm_dist.learner import checkpoint as ckpt
from sm_dist.logs import log_to_run_dir, route_worker_logs
from sm_dist.recovery import (
    LearnerDied,
    RunState,
    install_signal_handlers,
    rescue_checkpoint,
    save_checkpoint,
)
from sm_dist.status import RunDirBusy, claim_run_dir, release_run_dir
from sm_dist.validate import preflight

log = logging.getLogger("sm_dist.driver")


class Trainer:
    """Holds the actors and the loop state; `run_loop` drives it, one `run_step` at a time."""

    def __init__(self, ray, cfg, replay, expert, workers, names, learners, state: RunState, logger):
        from sm_dist.sync.object_store import ObjectStoreTransport

        self.ray, self.cfg = ray, cfg
        self.replay, self.expert, self.workers, self.names = replay, expert, workers, names
        self.learners = learners
        self.transport = ObjectStoreTransport(workers, cfg.sync.timeout_s, names)
        self.s, self.log = state, logger
        self.inflight: dict = {}  # future -> (worker index, "batch" | "sync", version)
        self.sync_started: dict[int, float] = {}  # version -> monotonic time it was sent
        self.stop_requested = False
        self.restarts: dict[str, int] = {}  # rollout-worker restarts after a crash
        self.learner_restarts = 0  # times the learner ranks were rebuilt from a checkpoint
        # (version, ObjectRef) of the last published weights (object_store), re-sent to a restarted
        # worker; s.version moves on before the next blob exists, so the pair keeps its own version
        self.published: tuple[int, object] | None = None
        self.rollout_stats: dict[str, list[float]] = {}
        self.busy = {"learner_s": 0.0, "gen_s": 0.0}
        self.t_start = time.perf_counter()

    # -- workers
    def submit_batch(self, i: int) -> None:
        self.inflight[self.workers[i].run_batch.remote()] = (i, "batch", None)

    def handle(self, fut) -> None:
        i, kind, version = self.inflight.pop(fut)
        try:
            out = self.ray.get(fut)
        except self.ray.exceptions.RayActorError as e:
            if isinstance(e, self.ray.exceptions.RayTaskError):
                raise  # the worker is alive; an actor it called (e.g. the replay buffer) died
            self.worker_died(i, kind, e)
            return
        if kind == "sync":
            from sm_dist.sync.base import confirm_version

            confirm_version(self.names[i], out, version)
            self.count_sync(self.names[i])
            if not any(k == "sync" and v == version for _, k, v in self.inflight.values()):
                self.sync_started.pop(version, None)  # every worker has it: no deadline left to watch
            return
        self.s.rollout_batches += 1
        self.busy["gen_s"] += out.get("rollout/gen_s", 0.0)
        for k, v in out.items():
            self.rollout_stats.setdefault(k, []).append(v)
        if self.cfg.run.asynchronous and not self.stop_requested:
            self.submit_batch(i)

    def count_sync(self, name: str) -> None:
        self.s.syncs[name] = self.s.syncs.get(name, 0) + 1

    def worker_died(self, i: int, kind: str, err: Exception) -> None:
        """Rollout worker `i` died during a `kind` call: wait for Ray to restart it (`rollout.max_restarts`),
        give it the latest weights, and resubmit its batch. Its lost batch is simply not in the buffer;
        the buffer's acknowledged rows are untouched."""
        name, cfg = self.names[i], self.cfg
        n = self.restarts[name] = self.restarts.get(name, 0) + 1
        why = describe_error(err)
        if n > cfg.rollout.max_restarts:
            raise RuntimeError(
                f"rollout worker {name} died {n} times (rollout.max_restarts={cfg.rollout.max_restarts}); "
                f"last: {why}"
            ) from err
        if cfg.sync.transport != "object_store":
            raise RuntimeError(
                f"rollout worker {name} died ({why}); a restarted worker cannot rejoin the "
                f"sync.transport={cfg.sync.transport} group. Resume the run (--resume), or use "
                "sync.transport=object_store, which survives worker restarts"
            ) from err
        log.warning(
            f"rollout worker {name} died during {kind} ({why}); restart {n}/{cfg.rollout.max_restarts}"
        )
        for f, (j, _, _) in list(self.inflight.items()):  # the dead incarnation's other calls fail too
            if j == i:
                del self.inflight[f]
        deadline = time.monotonic() + cfg.run.startup_timeout_s
        while True:  # calls fail with ActorUnavailableError while Ray restarts the actor
            try:
                self.ray.get(self.workers[i].version.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except (self.ray.exceptions.ActorUnavailableError, self.ray.exceptions.GetTimeoutError) as e2:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"rollout worker {name} did not restart within run.startup_timeout_s="
                        f"{cfg.run.startup_timeout_s}s"
                    ) from e2
                time.sleep(0.5)
        if self.published is not None:  # it restarted with its initial weights
            v, ref = self.published
            self.sync_started.setdefault(v, time.monotonic())
            (f,) = self.transport.send(v, ref, [self.workers[i]])
            self.inflight[f] = (i, "sync", v)
        if self.cfg.run.asynchronous and not self.stop_requested:  # its lost batch, whichever call failed
            self.submit_batch(i)

    def wait_for(self, futures: list, timeout_s: float | None = None) -> list:
        """Wait for `futures`, handling worker completions meanwhile; return their results. A failed
        future raises as soon as it lands: when one learner rank dies, the others hang in their
        collective and would never finish."""
        pending = list(futures)
        results = {}
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

    def check_sync_deadline(self) -> None:
        for i, kind, version in list(self.inflight.values()):
            if kind == "sync" and time.monotonic() - self.sync_started[version] > self.cfg.sync.timeout_s:
                from sm_dist.sync.base import WeightSyncError

                raise WeightSyncError(
                    f"{self.names[i]} did not apply weights version {version} within sync.timeout_s="
                    f"{self.cfg.sync.timeout_s}s"
                )

    def learner_rank(self, err: BaseException, probe_s: float = 10.0) -> int | None:
        """The rank of a dead learner behind `err`, or None. Either `err` reports a learner's death, or a
        call failed with an error (e.g. a learner's collective lost its peer), and then a rank whose
        process is gone is found by asking every rank for its step (a rank stuck in a collective does
        not answer within `probe_s` and counts as alive)."""
        ray = self.ray
        ids = [lr._actor_id.hex() for lr in self.learners]
        if isinstance(err, ray.exceptions.RayActorError) and not isinstance(err, ray.exceptions.RayTaskError):
            return ids.index(err.actor_id) if err.actor_id in ids else None
        if not isinstance(err, ray.exceptions.RayTaskError):
            return None
        futs = [lr.get_step.remote() for lr in self.learners]
        ready, _ = ray.wait(futs, num_returns=len(futs), timeout=probe_s)
        for rank, f in enumerate(futs):
            if f in ready:
                try:
                    ray.get(f)
                except ray.exceptions.RayActorError:
                    return rank
        return None

    def restart_learners(self, rank: int, err: BaseException) -> None:
        """Learner `rank` died: replace every rank (the survivors hang in their collective), load the
        latest checkpoint into the new ones (or start from the initial model), re-publish their weights
        under a new version, and go on from the checkpoint's step. Rollout workers, both buffers and
        their rows are untouched; the replay rows written since the checkpoint came from weights the
        new learners never had, and age out through buffer.max_staleness like any stale rows."""
        cfg, ray = self.cfg, self.ray
        self.learner_restarts += 1
        n, most = self.learner_restarts, cfg.learner.max_restarts
        why = describe_error(err)
        if n > most:
            raise LearnerDied(
                f"learner rank {rank} died; learner.max_restarts={most} restarts used up: {why}"
            ) from err
        if cfg.sync.transport != "object_store":
            raise LearnerDied(
                f"learner rank {rank} died ({why}); new learners cannot rejoin the sync.transport="
                f"{cfg.sync.transport} group. Resume the run (--resume), or use sync.transport=object_store, "
                "which survives learner restarts"
            ) from err
        last = ckpt.latest_checkpoint(cfg.run.run_dir)
        src = f"checkpoint {last}" if last else f"the initial model {cfg.model.dir} (no checkpoint yet)"
        log.warning(f"learner rank {rank} died at step {self.s.step} ({why}); restart {n}/{most}: "
                    f"every rank restarts from {src}")  # fmt: skip
        for lr in self.learners:
            ray.kill(lr, no_restart=True)
        self.learners = build_learners(ray, cfg, str(last / "model") if last else cfg.model.dir)
        self.wait_for([lr.get_step.remote() for lr in self.learners], cfg.run.startup_timeout_s)
        step = 0
        if last is not None:
            self.wait_for([lr.load_checkpoint.remote(str(last)) for lr in self.learners])
            step = ckpt.read_run_state(last)["step"]
        self.s.step = step
        self.publish()  # the workers drop the lost steps' weights; the version keeps counting up
        log.info(f"learners restarted at step {step}, weights version {self.s.version}")

    def publish(self) -> dict[str, float]:
        """Send rank 0's weights to every worker: an object-store ref queued after each worker's current
        batch, or (gloo / nccl) a collective broadcast that waits for the current batches to end."""
        t0 = time.perf_counter()
        self.s.version += 1
        if self.cfg.sync.transport != "object_store":
            m = self.wait_for([lr.publish_weights.remote(self.s.version) for lr in self.learners])[0]
            for n in self.names:  # publish_weights returns once every worker confirmed the version
                self.count_sync(n)
            return {**m, "sync/publish_s": time.perf_counter() - t0}
        refs = [lr.state_dict_blob.remote() for lr in self.learners]
        # FSDP2 gathers on every rank; rank 0's bytes stay in the object store. Rank 0 runs get_step
        # after state_dict_blob (actor calls run in order): it answers once the blob exists, and
        # raises if rank 0 died, before a dead ref reaches the workers
        self.wait_for(refs[1:] + [self.learners[0].get_step.remote()])
        self.published = (self.s.version, refs[0])  # the ref is held until the next publish
        self.sync_started[self.s.version] = time.monotonic()
        # queued behind each worker's current batch: applied between batches, never inside one
        for i, fut in enumerate(self.transport.send(self.s.version, refs[0])):
            self.inflight[fut] = (i, "sync", self.s.version)
        return {"sync/version": float(self.s.version), "sync/publish_s": time.perf_counter() - t0}

    # -- learners
    def sample(self) -> tuple[list, list]:
        """Per-rank (data, replay) Arrow batches: each source split evenly over ranks."""
        import pyarrow as pa

        M = len(self.learners)
        n_rep, n_dat = self.cfg.split_batch()
        min_v = self.s.version - self.cfg.buffer.max_staleness
        need = self.cfg.buffer.wait_for_replay and self.s.step >= self.cfg.objective.warmup_steps
        while True:
            rep = self.ray.get(
                self.replay.sample.remote(n_rep, min_version=min_v, newest_first=self.cfg.buffer.newest_first)
            )
            if rep.num_rows >= n_rep or not need or self.stop_requested:
                break
            self.wait_for_rollouts()  # bounded staleness: the learner waits for fresh rollouts
        k = (rep.num_rows // M) * M
        rep = rep.slice(0, k)
        fill = n_rep - k if self.cfg.buffer.fill_with_data else 0
        dat = self.ray.get(self.expert.sample.remote(n_dat + fill))
        if dat.num_rows % M:
            dat = dat.slice(0, (dat.num_rows // M) * M)

        def shard(b, r):
            return b.take(pa.array(list(range(r, b.num_rows, M)), type=pa.int64()))

        return [shard(dat, r) for r in range(M)], [shard(rep, r) for r in range(M)]

    def wait_for_rollouts(self) -> None:
        t0 = time.perf_counter()
        if not self.inflight:
            raise RuntimeError("the learner waits for rollouts, but no rollout batch is in flight")
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=self.cfg.sync.timeout_s)
        if not ready:
            raise TimeoutError(
                f"no rollout batch finished within sync.timeout_s={self.cfg.sync.timeout_s}s while the learner "
                "waited for fresh rows (buffer.wait_for_replay)"
            )
        self.handle(ready[0])
        self.busy["wait_s"] = self.busy.get("wait_s", 0.0) + time.perf_counter() - t0

    def learner_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        data, rep = self.sample()
        futs = [lr.train_step.remote(d, r) for lr, d, r in zip(self.learners, data, rep)]
        results = self.wait_for(futs)
        self.busy["learner_s"] += max(m["perf/learner_step_s"] for m in results)
        avg = {k: sum(m[k] for m in results) / len(results) for k in results[0]}
        avg["perf/step_s"] = time.perf_counter() - t0
        return avg

    def rollout_round(self) -> None:
        """Synchronous mode: one batch per worker, learners idle meanwhile."""
        for i in range(len(self.workers)):
            self.submit_batch(i)
        while any(kind == "batch" for kind in (v[1] for v in self.inflight.values())):
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1)
            self.handle(ready[0])

    def metrics(self, learner_m: dict, extra: dict) -> dict[str, float]:
        wall = time.perf_counter() - self.t_start
        out = {**learner_m, **extra}
        for k, v in self.rollout_stats.items():
            out[k] = sum(v) / len(v)
        self.rollout_stats = {}
        out["sync/applied_min"] = float(min([self.s.syncs.get(n, 0) for n in self.names]))
        out["rollout/batches_total"] = float(self.s.rollout_batches)
        out["run/learner_restarts"] = float(self.learner_restarts)
        out["perf/learner_busy"] = self.busy["learner_s"] / wall
        out["perf/rollout_busy"] = self.busy["gen_s"] / wall / len(self.workers)
        out["perf/learner_wait_s_total"] = self.busy.get("wait_s", 0.0)
        return out


def step_limit(cfg: Config) -> float:
    """run.total_steps, or infinity for a run that goes on until it is stopped (total_steps: null)."""
    return float("inf") if cfg.run.total_steps is None else cfg.run.total_steps


def run_step(t: Trainer) -> dict[str, float]:
    """One learner step, then (on their schedules) a weight publish, a checkpoint and a metrics line."""
    cfg = t.cfg
    if not cfg.run.asynchronous:
        t.rollout_round()
    m = t.learner_step()
    t.s.step += 1
    extra: dict[str, float] = {}
    if t.s.step % cfg.sync.every == 0:
        extra.update(t.publish())
    t.check_sync_deadline()
    if t.s.step % cfg.run.checkpoint_every == 0 and t.s.step < step_limit(cfg):
        save_checkpoint(t)
    if t.s.step % cfg.run.log_every == 0:
        t.log.log(t.s.step, t.metrics(m, extra))
    return m


def run_loop(t: Trainer) -> None:
    from tqdm import tqdm

    cfg = t.cfg
    bar = tqdm(
        total=cfg.run.total_steps, initial=t.s.step, disable=not cfg.run.progress, desc="sm-dist train"
    )
    if cfg.run.asynchronous:
        for i in range(len(t.workers)):
            t.submit_batch(i)
    while t.s.step < step_limit(cfg) and not t.stop_requested:
        try:
            m = run_step(t)
        except t.ray.exceptions.RayError as e:
            rank = t.learner_rank(e)
            if rank is None:
                raise
            t.restart_learners(rank, e)
            bar.reset(total=cfg.run.total_steps)
            bar.update(t.s.step)
            continue
        bar.update(1)
        bar.set_postfix(loss=f"{m.get('loss/total', float('nan')):.3f}", v=t.s.version)
    bar.close()
    # drain: let in-flight batches and syncs land so the final state counts them
    t.stop_requested = True
    t.wait_for([], None)
    while t.inflight:
        ready, _ = t.ray.wait(list(t.inflight), num_returns=1, timeout=cfg.sync.timeout_s)
        if not ready:
            raise TimeoutError(f"rollout workers did not finish within sync.timeout_s={cfg.sync.timeout_s}s")
        t.handle(ready[0])


def train(cfg: Config, resume: str | None = None, address: str | None = None) -> int:
    """Run (or resume) a training job; returns the process exit code. The run directory is claimed
    for the duration (`sm_dist.status`): a second driver on it is refused."""
    run_dir = Path(cfg.run.run_dir)
    last = preflight(cfg, resume)  # model, data, checkpoint: before anything is written or started
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        claim_run_dir(run_dir)
    except RunDirBusy as e:
        raise ConfigError("run.run_dir", str(e)) from None
    try:
        return _train(cfg, run_dir, last, resume, address)
    finally:
        release_run_dir(run_dir)


def _finish(t: Trainer, run_dir: Path, final: Path, logger) -> None:
    """summary.json, and the end summary on stdout (the command's result; logs go to stderr)."""
    summary = {
        "run_dir": str(run_dir),
        "step": t.s.step,
        "version": t.s.version,
        "syncs_applied": t.s.syncs,
        "rollout_batches": t.s.rollout_batches,
        "worker_restarts": t.restarts,
        "learner_restarts": t.learner_restarts,
        "last_checkpoint": str(final),
        "checkpoints": [str(p) for p in ckpt.list_checkpoints(run_dir)],
        "metrics": str(logger.path),
        "tensorboard": str(logger.tb_dir),
        "buffer": t.ray.get(t.replay.stats.remote()),
        "stopped_early": t.s.step < step_limit(t.cfg),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(
        f"{'stopped' if summary['stopped_early'] else 'done'} at step {t.s.step} "
        f"(weights version {t.s.version})\n  run dir:     {run_dir}\n  checkpoint:  {final}\n"
        f"  metrics:     {logger.path}\n  tensorboard: tensorboard --logdir {logger.tb_dir}\n"
        f"  resume with: sm-dist train <config> --resume {run_dir}"
    )


def _train(cfg: Config, run_dir: Path, last: Path | None, resume: str | None, address: str | None) -> int:
    from transformers import AutoTokenizer

    from sm_dist.metrics import MetricsLogger

    text = dump_config(cfg)
    log_to_run_dir(run_dir)
    log.debug(f"resolved config:\n{text}")
    log.info(f"run dir {run_dir}: resolved config in config.yaml, logs in driver.log and workers.log")
    (run_dir / ("config.resume.yaml" if resume else "config.yaml")).write_text(text)
    prepare_model(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model.dir)
    data_rows, prompts, targets = build_data(cfg, tok)
    if len(prompts) < cfg.rollout.num_workers:
        raise ConfigError(
            "rollout.num_workers", f"{len(prompts)} prompts cannot feed {cfg.rollout.num_workers} workers."
        )
    saved = ckpt.read_run_state(last) if last else {}
    state = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
    ray, local = start_ray(cfg, address)
    route_worker_logs(run_dir)
    try:
        check_resources(ray, cfg)
        model_dir = str(ckpt.pin_model(last, run_dir)) if last else cfg.model.dir
        # prompt_refs stay referenced until train() returns: a restarted worker reads its prompts from them
        replay, expert, workers, names, learners, prompt_refs = build_actors(
            ray, cfg, prompts, model_dir, targets
        )
        log.info(f"actors ready in {wait_ready(ray, cfg, workers, names, learners):.1f}s")
        connect_weight_transfer(ray, cfg, learners, workers, names)
        r = cfg.run
        wandb = {"project": r.wandb_project, "entity": r.wandb_entity, "mode": r.wandb_mode}
        logger = MetricsLogger(run_dir, wandb=wandb, config=cfg.model_dump())
        logger.text("config", text)
        t = Trainer(ray, cfg, replay, expert, workers, names, learners, state, logger)
        install_signal_handlers(t)
        if last:
            t.wait_for([lr.load_checkpoint.remote(str(last)) for lr in learners])
            log.info(f"resumed from {last} at step {state.step}, weights version {state.version}")
            t.s.version -= 1
            t.publish()  # tags the workers with the checkpoint's version (their engines loaded its weights)
        if ray.get(expert.stats.remote())["rows"] == 0:
            from sm_dist.buffer.schema import rows_to_batch

            ray.get(expert.add.remote(rows_to_batch(data_rows)))
            state.expert_rows = len(data_rows)
        try:
            run_loop(t)
        except Exception as e:
            rescue_checkpoint(t, e)
            raise
        final = save_checkpoint(t)
        logger.close()
        _finish(t, run_dir, final, logger)
        return 0
    finally:
        if local:
            ray.shutdown()
