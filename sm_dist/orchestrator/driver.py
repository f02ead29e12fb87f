"""The driver (`sm-dist train`): builds the actors and runs the asynchronous actor/learner loop.

    expert rows ──► expert buffer ─┐
    RolloutWorker×N ──► replay buffer ─┴─► BatchSampler ─► LearnerGroup (ranks) ─► weights (version v)
          ▲                                                                               │
          └────── learner rank 0's sender ──► receive_weights(stage, info, v), between batches ─┘

Set-up, then one loop that reads top to bottom (`run_step`): sample, step, publish every `sync.every`
steps, check the sync deadline, checkpoint, log. Its parts:
- `RolloutScheduler` (sm_dist/orchestrator/scheduler.py): every worker always has one `run_batch` in flight; while
  the learners step, it `ray.wait`s on learner and worker futures together, resubmitting each worker's
  next batch as soon as its last one lands; typed records of the batches and weight confirmations in
  flight; worker deaths and late syncs.
- `LearnerGroup` (sm_dist/orchestrator/learners.py): the ranks' step, publish, checkpoint, and their rebuild
  from the latest checkpoint when one dies.
- `BatchSampler` (sm_dist/orchestrator/sampler.py): the data and replay halves of each step, bounded staleness.
- between two steps (`Controller.apply`, sm_dist/orchestrator/control.py): the control API's queued calls (scale,
  pause, resume, checkpoint, stop; the server is sm_dist/service/api.py), rollout workers joining
  (`WorkerPool`, sm_dist/orchestrator/scaling.py), the autoscaler, and new data.watch_dir files (sm_dist/data/watch.py).
- the weight transport (sm_dist/sync): learner rank 0 sends; an object-store send returns at once and
  the scheduler tracks each worker's confirmation; a collective send (gloo, nccl) returns once every
  worker has the version, the scheduler handling batch completions meanwhile.

Deliberate choices: expert rows live in their own `ReplayBuffer` actor (`<run_dir>/expert/buffer`) and
rollouts in the replay buffer (`<run_dir>/buffer`: `buffer.shards` actors, sm_dist/buffer/shards.py), so
"½ data ½ replay" is two samples, not a filter.
Until the replay buffer has enough fresh rows, the batch is filled with data rows (an even number per
learner rank, so the DDP equivalence of learner.py holds).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from sm_dist.config import Config, ConfigError, dump_config
from sm_dist.data.prepare import TrainData, build_data, prepare_model
from sm_dist.eval import heldout
from sm_dist.learner import checkpoint as ckpt
from sm_dist.orchestrator.actors import (
    build_actors,
    build_learners,
    check_resources,
    learner_placement,
    start_ray,
    wait_ready,
)
from sm_dist.orchestrator.control import Controller
from sm_dist.orchestrator.faults import (
    RunState,
    install_signal_handlers,
    rescue_checkpoint,
    save_checkpoint,
)
from sm_dist.orchestrator.learners import LearnerGroup
from sm_dist.orchestrator.sampler import BatchSampler
from sm_dist.orchestrator.scaling import WorkerPool, autoscaler
from sm_dist.orchestrator.scheduler import RolloutPolicy, RolloutScheduler
from sm_dist.orchestrator.storage import (
    check_shared_run_dir,
    claim_fresh_run_dir,
    keep_config_history,
    set_aside_history,
)
from sm_dist.orchestrator.validate import preflight
from sm_dist.service.logs import log_to_run_dir, route_worker_logs
from sm_dist.service.status import RunDirBusy, check_free, claim_run_dir, note_children, release_run_dir

log = logging.getLogger("sm_dist.driver")


class Trainer:
    """One run's parts: the rollout scheduler, the learner group, the batch sampler and the run state.
    `run_loop` drives it, one `run_step` at a time; `faults` checkpoints it."""

    def __init__(
        self, ray, cfg: Config, replay, expert, workers, names, learners, state: RunState, logger, pg=None
    ):
        """`pg`: the learners' placement group (`sm_dist.orchestrator.actors.learner_placement`); restarts reuse it."""
        self.ray, self.cfg, self.s, self.log = ray, cfg, state, logger
        self.replay, self.expert, self.names = replay, expert, names
        policy = RolloutPolicy(
            max_restarts=cfg.rollout.max_restarts, sync_timeout_s=cfg.sync.timeout_s,
            startup_timeout_s=cfg.run.startup_timeout_s, asynchronous=cfg.run.asynchronous,
            restarts_rejoin=cfg.sync.transport.survives_restarts,
        )  # fmt: skip
        self.sched = RolloutScheduler(ray, workers, names, policy, self._resend, state.syncs)
        self.sched.batches = state.rollout_batches
        self.group = LearnerGroup(
            ray, cfg, learners, self.sched.wait_for, lambda d: build_learners(ray, cfg, d, pg)
        )
        self.sched.reconnect = self.group.connect  # scaling: the sender follows the live workers
        self.pool = None  # the WorkerPool (sm_dist/orchestrator/scaling.py), set by _train
        self.control = Controller(cfg.run.run_dir)  # calls from the control API, applied between steps
        self.autoscaler = None  # rollout.max_workers (sm_dist/orchestrator/scaling.py), set by _train
        self.watcher = None  # data.watch_dir (sm_dist/data/watch.py), set by _train
        self.sampler = BatchSampler(ray, cfg, replay, expert)
        self.t_start = time.perf_counter()

    @property
    def stop_requested(self) -> bool:
        return self.sched.stopping

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        self.sched.stopping = value

    @property
    def learners(self) -> list:
        return self.group.learners

    def wait_for(self, futures: list, timeout_s: float | None = None) -> list:
        return self.sched.wait_for(futures, timeout_s)

    def _resend(self, i: int):
        return self.group.resend(i)

    def publish(self) -> dict[str, float]:
        """Rank 0 sends the next weights version to every worker (sm_dist.sync); the confirmations
        still to come are tracked beside the rollouts."""
        t0 = time.perf_counter()
        self.s.version += 1
        d = self.group.publish(self.s.version)
        self.sched.track(d)
        return {**d.metrics, "sync/publish_s": time.perf_counter() - t0}

    def learner_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        data, rep = self.sampler.sample(
            len(self.learners), self.s.step, self.s.version, self.sched.wait_one, lambda: self.stop_requested
        )
        m = self.group.step(data, rep)
        m["perf/step_s"] = time.perf_counter() - t0
        return m

    def restart_learners(self, rank: int, err: BaseException) -> None:
        """Learner `rank` died: the group is rebuilt from the latest checkpoint and its weights are
        re-published under a new version (the workers drop the lost steps' weights)."""
        self.sched.drop_syncs()
        self.s.step = self.group.restart(rank, err, self.sched.workers, self.names, self.s.step)
        self.publish()
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

    def state(self) -> RunState:
        """The run state as a checkpoint records it."""
        self.s.rollout_batches = self.sched.batches
        return self.s


def step_limit(cfg: Config) -> float:
    """run.total_steps, or infinity for a run that goes on until it is stopped (total_steps: null)."""
    return float("inf") if cfg.run.total_steps is None else cfg.run.total_steps


def run_step(t: Trainer) -> dict[str, float]:
    """One learner step, then (on their schedules) a weight publish, a checkpoint and a metrics line."""
    cfg = t.cfg
    if not cfg.run.asynchronous:
        t.sched.run_round()
    m = t.learner_step()
    t.s.step += 1
    extra: dict[str, float] = {}
    if t.s.step % cfg.sync.every == 0:
        extra.update(t.publish())
    t.sched.check_sync_deadline()
    if t.s.step % cfg.run.checkpoint_every == 0 and t.s.step < step_limit(cfg):
        save_checkpoint(t)
    if t.s.step % cfg.run.log_every == 0:
        logged = t.metrics(m, extra)
        t.log.log(t.s.step, logged)
        t.control.update(t, logged)
    return m


def run_loop(t: Trainer) -> None:
    from tqdm import tqdm

    cfg = t.cfg
    bar = tqdm(
        total=cfg.run.total_steps, initial=t.s.step, disable=not cfg.run.progress, desc="sm-dist train"
    )
    if cfg.run.asynchronous:
        t.sched.submit_all()
    while t.s.step < step_limit(cfg) and not t.stop_requested:
        t.control.apply(t)  # control API calls, workers joining; blocks while paused (control.py)
        if t.stop_requested:
            break
        try:
            m = run_step(t)
        except t.ray.exceptions.RayError as e:
            rank = t.group.dead_rank(e)
            if rank is None:
                raise
            t.restart_learners(rank, e)
            bar.reset(total=cfg.run.total_steps)
            bar.update(t.s.step)
            continue
        bar.update(1)
        bar.set_postfix(loss=f"{m.get('loss/total', float('nan')):.3f}", v=t.s.version)
    bar.close()
    t.sched.drain()  # let in-flight batches and syncs land so the final state counts them


def train(cfg: Config, resume: str | None = None, address: str | None = None) -> int:
    """Run (or resume) a training job; returns the process exit code. The run directory is claimed
    for the duration (`sm_dist.service.status`): a second driver on it is refused."""
    run_dir = Path(cfg.run.run_dir)
    try:  # a live driver on it first: "in use" says more than "holds a run"
        check_free(run_dir)
    except RunDirBusy as e:
        raise ConfigError("run.run_dir", str(e)) from None
    if not resume and not cfg.run.overwrite:
        claim_fresh_run_dir(run_dir, overwrite=False)  # a run already there: refused, nothing touched
    last, data = preflight(cfg, resume)  # model, data, checkpoint: before anything is written or started
    if not resume:
        claim_fresh_run_dir(run_dir, cfg.run.overwrite)  # run.overwrite: the old run moves aside
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        claim_run_dir(run_dir)
    except RunDirBusy as e:
        raise ConfigError("run.run_dir", str(e)) from None
    try:
        return _train(cfg, run_dir, last, resume, address, data)
    finally:
        release_run_dir(run_dir)


def attach_service_parts(t: Trainer, tok, prompts: list, targets: list, model_dir: str) -> None:
    """Live scaling, autoscaling (rollout.max_workers) and data.watch_dir (README "Running as a service")."""
    cfg = t.cfg
    t.pool = WorkerPool(t.ray, cfg, t.sched, prompts, targets, model_dir, t.replay, t.expert)
    t.autoscaler = autoscaler(cfg, t.pool)
    if cfg.data.watch_dir:
        from sm_dist.data.watch import DataWatcher

        t.watcher = DataWatcher(cfg, tok, t.ray, t.expert, cfg.run.run_dir)


def run_served(t: Trainer, run_dir: Path) -> None:
    """`run_loop` with the control API up (a failed loop leaves a rescue checkpoint)."""
    api = start_api(t, run_dir)
    try:
        run_loop(t)
    except Exception as e:
        rescue_checkpoint(t, e)
        raise
    finally:
        if api is not None:
            api.stop()


def start_api(t: Trainer, run_dir: Path):
    """The control API (sm_dist/service/api.py) on run.api_host:run.api_port, or None with run.api_port: null."""
    if t.cfg.run.api_port is None:
        return None
    from sm_dist.service.api import ApiServer

    t.control.update(t)
    r = t.cfg.run
    try:
        return ApiServer(t.control, run_dir, r.api_host, r.api_port).start()
    except OSError as e:  # the address is taken or not this host's
        raise ConfigError(
            "run.api_port",
            f"the control API cannot listen on {r.api_host}:{r.api_port} ({e}).",
            "pick another run.api_port (0: a free one) or run.api_host",
        ) from None


def _finish(t: Trainer, run_dir: Path, final: Path, logger, acc: dict | None = None) -> None:
    """summary.json, and the end summary on stdout (the command's result; logs go to stderr).
    `acc`: the held-out accuracy record (sm_dist/eval/heldout.py), None when not measured."""
    summary = {
        "run_dir": str(run_dir),
        "step": t.s.step,
        "version": t.s.version,
        "syncs_applied": t.s.syncs,
        "rollout_batches": t.sched.batches,
        "worker_restarts": t.sched.restarts,
        "learner_restarts": t.group.restarts,
        "learner_rendezvous": t.group.rendezvous,  # rank 0's node address:port, where the ranks met
        "driver_node": t.ray.util.get_node_ip_address(),
        "last_checkpoint": str(final),
        "checkpoints": [str(p) for p in ckpt.list_checkpoints(run_dir)],
        "metrics": str(logger.path),
        "tensorboard": str(logger.tb_dir),
        "buffer": t.replay.stats(),  # all shards together (and each under "shards" when several)
        "stopped_early": t.s.step < step_limit(t.cfg),
        "heldout": acc,  # {"path", "n", "before", "after", ...} or None (run.eval_path: null)
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(
        f"{'stopped' if summary['stopped_early'] else 'done'} at step {t.s.step} "
        f"(weights version {t.s.version})\n  run dir:     {run_dir}\n  checkpoint:  {final}\n"
        f"  metrics:     {logger.path}\n  tensorboard: tensorboard --logdir {logger.tb_dir}\n"
        f"  continue with: sm-dist train --resume {run_dir} [key=value ...]  (its saved config; e.g. "
        f"run.total_steps={t.s.step * 2} to train on)"
    )
    if text := heldout.line(acc):
        print(f"  {text}")  # last: the line that shows what the run learned


def _begin(t: Trainer, last: Path | None, data_rows: list) -> None:
    """Connect the weight transport, load the checkpoint resumed from (if any), seed the expert buffer."""
    t.group.connect(t.sched.workers, t.names)
    if last:
        t.group.load(str(last))
        log.info(f"resumed from {last} at step {t.s.step}, weights version {t.s.version}")
        t.s.version -= 1
        t.publish()  # tags the workers with the checkpoint's version (their engines loaded its weights)
    if t.ray.get(t.expert.stats.remote())["rows"] == 0:
        from sm_dist.buffer.schema import rows_to_batch

        t.ray.get(t.expert.add.remote(rows_to_batch(data_rows)))
        t.s.expert_rows = len(data_rows)


def _record_start(run_dir: Path, text: str, last: Path | None) -> dict:
    """Logs to the run dir and its config.yaml written; on a resume from `last`, the previous config kept
    and the metric rows past its step set aside. Returns the checkpoint's run state ({} when fresh)."""
    log_to_run_dir(run_dir)
    log.debug(f"resolved config:\n{text}")
    log.info(f"run dir {run_dir}: resolved config in config.yaml, logs in driver.log and workers.log")
    saved = ckpt.read_run_state(last) if last else {}
    step = saved.get("step", 0)
    if last and (prev := keep_config_history(run_dir, text, step)):
        log.info(f"--resume: the run's previous config is kept as {prev.name}")
    (run_dir / "config.yaml").write_text(text)
    if last and (n := set_aside_history(run_dir, step)):
        log.info(f"--resume: {n} metric rows past step {step} (redone now) moved to metrics.abandoned.jsonl")
    return saved


def _train(
    cfg: Config,
    run_dir: Path,
    last: Path | None,
    resume: str | None,
    address: str | None,
    data: TrainData | None,
) -> int:
    from transformers import AutoTokenizer

    from sm_dist.service.metrics import MetricsLogger

    text = dump_config(cfg)
    saved = _record_start(run_dir, text, last)
    prepare_model(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model.dir)
    data_rows, prompts, targets = build_data(cfg, tok, data)  # data: read once, by preflight
    held = heldout.load_heldout(cfg, tok)  # run.eval_path, read before Ray starts (None: not measured)
    if len(prompts) < cfg.rollout.num_workers:
        raise ConfigError(
            "rollout.num_workers",
            f"{len(prompts)} prompts cannot feed {cfg.rollout.num_workers} workers.",
            f"set rollout.num_workers={len(prompts)} or fewer, or give more data",
        )
    state = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
    ray, local = start_ray(cfg, address)
    route_worker_logs(run_dir)
    try:
        check_resources(ray, cfg)
        model_dir = str(ckpt.pin_model(last, run_dir)) if last else cfg.model.dir
        # prompt_refs stay referenced until train() returns: a restarted worker reads its prompts from them
        pg = learner_placement(ray, cfg)  # the learners' bundles, reserved before anything starts
        replay, expert, workers, names, learners, prompt_refs = build_actors(
            ray, cfg, prompts, model_dir, targets, pg
        )
        # the ranks are up (the engines may not be): every learner node must see run_dir as the driver does
        check_shared_run_dir(ray, run_dir, learners, cfg.run.startup_timeout_s)
        log.info(f"actors ready in {wait_ready(ray, cfg, workers, names, learners):.1f}s")
        note_children(run_dir)  # a kill -9 of this driver: the next start on run_dir stops what it left
        r = cfg.run
        wandb = {"project": r.wandb_project, "entity": r.wandb_entity, "mode": r.wandb_mode}
        logger = MetricsLogger(
            run_dir, wandb=wandb, config=cfg.model_dump(), resume_step=state.step if last else None
        )
        logger.text("config", text)
        t = Trainer(ray, cfg, replay, expert, workers, names, learners, state, logger, pg)
        attach_service_parts(t, tok, prompts, targets, model_dir)
        t.pool.fixed_size = local
        install_signal_handlers(t)
        _begin(t, last, data_rows)
        acc = heldout.measure(t, held, tok, "before")  # on the workers' engines (sm_dist/eval/heldout.py)
        run_served(t, run_dir)
        # after a stop signal the final checkpoint is bounded: Ray kills the job later (run.stop_timeout_s)
        final = save_checkpoint(t, timeout_s=cfg.run.stop_timeout_s if t.stop_requested else None)
        acc = heldout.measure(t, held, tok, "after") or acc
        logger.close()
        _finish(t, run_dir, final, logger, acc)
        return 0
    finally:
        if local:
            ray.shutdown()
