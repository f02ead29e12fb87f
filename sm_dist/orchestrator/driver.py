"""The driver (`sm-dist train`): builds the actors, then runs the learner loop (`learn`).

    expert rows ──► expert buffer ─┐
    RolloutWorker×N ──► replay buffer ─┴─► BatchSampler ─► LearnerGroup (ranks) ─► weights (version v)
          ▲                                                                               │
          └────── learner rank 0's sender ──► receive_weights(stage, info, v), between batches ─┘

`train` claims the run dir and checks the inputs; `_run` sets up (data, Ray, actors, the
`Orchestrator` of sm_dist/orchestrator/run.py) and tears down; `learn` is the loop, top to bottom:
control calls, sample, step, publish every `sync.every` steps, the sync deadline, checkpoint, log.
`learn` runs on one event loop (the `Orchestrator`'s, on this thread) beside a loop per rollout worker
that submits its next batch as soon as the last one lands (sm_dist/orchestrator/rollouts.py): while the
learners' step is awaited, the workers' loops go on.

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

from sm_dist.config import Config, ConfigError, dump_config, step_limit
from sm_dist.data.prepare import TrainData, build_data, prepare_model
from sm_dist.eval import heldout
from sm_dist.learner import checkpoint as ckpt
from sm_dist.orchestrator.actors import (
    build_actors,
    check_resources,
    learner_placement,
    start_ray,
    wait_ready,
)
from sm_dist.orchestrator.faults import RunState, install_signal_handlers
from sm_dist.orchestrator.run import Orchestrator, RunActors
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


async def learn(o: Orchestrator) -> None:
    """The learner loop, until run.total_steps or a stop (a signal, the control API). It runs on the
    run's event loop (`o.run(learn(o))`), beside a loop per rollout worker (`o.sched`)."""
    from tqdm import tqdm

    cfg, s = o.cfg, o.s
    bar = tqdm(total=cfg.run.total_steps, initial=s.step, disable=not cfg.run.progress, desc="sm-dist train")
    o.sched.start()  # asynchronous mode: from now on each worker's loop resubmits on its own
    while s.step < step_limit(cfg.run) and not o.stopping:
        o.tasks.check()  # a fatal error a worker's loop met during the last step stops the run here
        # control API calls, workers joining, the autoscaler, new data; waits while paused
        await o.control.apply()
        if o.stopping:
            break
        try:
            if not cfg.run.asynchronous:
                await o.sched.run_round()  # synchronous mode: one batch per worker, learners idle
            t0 = time.perf_counter()
            data, rep = await o.sampler.sample(len(o.group.learners), s.step, s.version)
            m = await o.group.step(data, rep)  # the workers' loops go on meanwhile
            m["perf/step_s"] = time.perf_counter() - t0
            s.step += 1
            extra = await o.sync.maybe_publish(s.step)
            o.sync.check_deadline()
            if s.step % cfg.run.checkpoint_every == 0 and s.step < step_limit(cfg.run):
                await o.ckpt.save(o.state())
        except o.ray.exceptions.RayError as e:
            if (rank := o.group.dead_rank(e)) is None:
                raise
            await o.restart_learners(rank, e)  # from the latest checkpoint; its weights re-published
            bar.reset(total=cfg.run.total_steps)
            bar.update(s.step)
            continue
        if s.step % cfg.run.log_every == 0:
            logged = o.metrics(m, extra)
            o.log.log(s.step, logged)
            o.control.update(logged)
        bar.update(1)
        bar.set_postfix(loss=f"{m.get('loss/total', float('nan')):.3f}", v=s.version)
    bar.close()
    o.tasks.check()
    o.pool.cancel_joins()  # workers still starting never had work
    await o.sched.drain()  # let in-flight batches and syncs land so the final state counts them


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
        return _run(cfg, run_dir, last, address, data)
    finally:
        release_run_dir(run_dir)


def start_api(o: Orchestrator, run_dir: Path):
    """The control API (sm_dist/service/api.py) on run.api_host:run.api_port, or None with run.api_port: null."""
    if o.cfg.run.api_port is None:
        return None
    from sm_dist.service.api import ApiServer

    o.control.update()
    r = o.cfg.run
    try:
        return ApiServer(o.control, run_dir, r.api_host, r.api_port).start()
    except OSError as e:  # the address is taken or not this host's
        raise ConfigError(
            "run.api_port",
            f"the control API cannot listen on {r.api_host}:{r.api_port} ({e}).",
            "pick another run.api_port (0: a free one) or run.api_host",
        ) from None


def _finish(o: Orchestrator, run_dir: Path, final: Path, logger, acc: dict | None = None) -> None:
    """summary.json, and the end summary on stdout (the command's result; logs go to stderr).
    `acc`: the held-out accuracy record (sm_dist/eval/heldout.py), None when not measured."""
    summary = {
        "run_dir": str(run_dir),
        "step": o.s.step,
        "version": o.s.version,
        "syncs_applied": o.s.syncs,
        "rollout_batches": o.sched.batches,
        "worker_restarts": o.sched.restarts.counts,
        "learner_restarts": o.group.restarts,
        "learner_rendezvous": o.group.rendezvous,  # rank 0's node address:port, where the ranks met
        "driver_node": o.ray.util.get_node_ip_address(),
        "last_checkpoint": str(final),
        "checkpoints": [str(p) for p in ckpt.list_checkpoints(run_dir)],
        "metrics": str(logger.path),
        "tensorboard": str(logger.tb_dir),
        "buffer": o.replay.stats(),  # all shards together (and each under "shards" when several)
        "stopped_early": o.s.step < step_limit(o.cfg.run),
        "heldout": acc,  # {"path", "n", "before", "after", ...} or None (run.eval_path: null)
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(
        f"{'stopped' if summary['stopped_early'] else 'done'} at step {o.s.step} "
        f"(weights version {o.s.version})\n  run dir:     {run_dir}\n  checkpoint:  {final}\n"
        f"  metrics:     {logger.path}\n  tensorboard: tensorboard --logdir {logger.tb_dir}\n"
        f"  continue with: sm-dist train --resume {run_dir} [key=value ...]  (its saved config; e.g. "
        f"run.total_steps={o.s.step * 2} to train on)"
    )
    if text := heldout.line(acc):
        print(f"  {text}")  # last: the line that shows what the run learned


async def _begin(o: Orchestrator, last: Path | None, data_rows: list) -> None:
    """Connect the weight transport, load the checkpoint resumed from (if any), seed the expert buffer."""
    await o.sync.reconnect()
    if last:
        await o.group.load(str(last))
        log.info(f"resumed from {last} at step {o.s.step}, weights version {o.s.version}")
        o.s.version -= 1
        await (
            o.sync.publish()
        )  # tags the workers with the checkpoint's version (their engines loaded its weights)
    if o.ray.get(o.expert.stats.remote())["rows"] == 0:
        from sm_dist.buffer.schema import rows_to_batch

        o.ray.get(o.expert.add.remote(rows_to_batch(data_rows)))
        o.s.expert_rows = len(data_rows)


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


def _run(cfg: Config, run_dir: Path, last: Path | None, address: str | None, data: TrainData | None) -> int:
    """Set up (data, Ray, the actors, the `Orchestrator`), `learn`, then the final checkpoint, the held-out
    accuracy and the summary. A failed loop leaves a rescue checkpoint. `data`: the training data
    preflight read (read once)."""
    from transformers import AutoTokenizer

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
        o = _start(ray, cfg, last, state, text, RunActors(prompts, targets, local), tok)
        try:
            return _drive(o, run_dir, last, data_rows, held, tok)
        finally:
            o.close()
    finally:
        if local:
            ray.shutdown()


def _drive(o: Orchestrator, run_dir: Path, last: Path | None, data_rows: list, held, tok) -> int:
    """The run on its event loop: start, held-out accuracy, `learn`, the final checkpoint, the summary."""
    o.run(_begin(o, last, data_rows))
    acc = heldout.measure(o, held, tok, "before")  # on the workers' engines (sm_dist/eval/heldout.py)
    api = start_api(o, run_dir)
    try:
        o.run(learn(o))
    except Exception as e:
        o.ckpt.rescue(o.state(), e)  # the event loop stopped: no worker task runs meanwhile
        raise
    finally:
        if api is not None:
            api.stop()
    # after a stop signal the final checkpoint is bounded: Ray kills the job later (run.stop_timeout_s)
    final = o.run(o.ckpt.save(o.state(), timeout_s=o.cfg.run.stop_timeout_s if o.stopping else None))
    acc = heldout.measure(o, held, tok, "after") or acc
    o.log.close()
    _finish(o, run_dir, final, o.log, acc)
    return 0


def _start(
    ray, cfg: Config, last: Path | None, state: RunState, text: str, a: RunActors, tok
) -> Orchestrator:
    """The actors started and ready (`a` brings the prompts; its actor fields are filled here), the
    metrics logger, the `Orchestrator`, the signal handlers."""
    from sm_dist.service.metrics import MetricsLogger

    run_dir = Path(cfg.run.run_dir)
    check_resources(ray, cfg)
    a.model_dir = str(ckpt.pin_model(last, run_dir)) if last else cfg.model.dir
    a.pg = learner_placement(ray, cfg)  # the learners' bundles, reserved before anything starts
    # prompt_refs stay referenced while the actors live: a restarted worker reads its prompts from them
    a.replay, a.expert, a.workers, a.names, a.learners, a.prompt_refs = build_actors(
        ray, cfg, a.prompts, a.model_dir, a.targets, a.pg
    )
    # the ranks are up (the engines may not be): every learner node must see run_dir as the driver does
    check_shared_run_dir(ray, run_dir, a.learners, cfg.run.startup_timeout_s)
    log.info(f"actors ready in {wait_ready(ray, cfg, a.workers, a.names, a.learners):.1f}s")
    note_children(run_dir)  # a kill -9 of this driver: the next start on run_dir stops what it left
    r = cfg.run
    wandb = {"project": r.wandb_project, "entity": r.wandb_entity, "mode": r.wandb_mode}
    logger = MetricsLogger(
        run_dir, wandb=wandb, config=cfg.model_dump(), resume_step=state.step if last else None
    )
    logger.text("config", text)
    watcher = None
    if cfg.data.watch_dir:  # README "Running as a service"
        from sm_dist.data.watch import DataWatcher

        watcher = DataWatcher(cfg, tok, ray, a.expert, cfg.run.run_dir)
    o = Orchestrator(ray, cfg, a, state, logger, watcher)
    install_signal_handlers(o)
    return o
