"""Building a run's actors from its config: Ray (joined or started on loopback), a resource check,
the replay and expert buffers, the rollout workers (each with its prompt shard), the learner ranks, and
the wait until every constructor has finished. `ray.remote` is applied here, so the role classes stay
plain Python (STYLE.md).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from sm_dist.config import Config, ConfigError
from sm_dist.errors import ActorStartError
from sm_dist.orchestrator.cluster import init_local_ray, ray_logging_level, set_process_env, vllm_env

log = logging.getLogger("sm_dist.driver")


def start_ray(cfg: Config, address: str | None):
    """Join the cluster at `address` (or RAY_ADDRESS / run.address); else start a local one."""
    import ray

    address = address or cfg.run.address or os.environ.get("RAY_ADDRESS")
    set_process_env()
    if address:
        ray.init(address=address, logging_level=ray_logging_level())
        return ray, False
    return init_local_ray(cfg.run.num_cpus, env=vllm_env(cfg.rollout.engine.cpu_kvcache_gib)), True


def check_resources(ray, cfg: Config) -> None:
    """Fail before starting anything when the cluster cannot hold the actors the config asks for."""
    have = ray.cluster_resources()
    r, lc = cfg.rollout, cfg.learner
    for res, per_worker, per_learner, fix in (
        ("CPU", "cpus_per_worker", "cpus_per_learner", "add CPUs (run.num_cpus)"),
        ("GPU", "gpus_per_worker", "gpus_per_learner", "run on a cluster with GPUs"),
    ):
        need = r.num_workers * getattr(r, per_worker) + lc.num_learners * getattr(lc, per_learner)
        if need > have.get(res, 0):
            raise ConfigError(
                "rollout.num_workers",
                f"rollout.num_workers={r.num_workers} x rollout.{per_worker}={getattr(r, per_worker)} + "
                f"{lc.num_learners} learners x learner.{per_learner}={getattr(lc, per_learner)} = {need} "
                f"{res}s, but the cluster has {have.get(res, 0)}.",
                f"lower rollout.num_workers / rollout.{per_worker} (or learner.{per_learner}), or {fix}",
            )
    for res, per in lc.resources.items():  # custom resources: the learners' only
        if lc.num_learners * per > have.get(res, 0):
            raise ConfigError(
                "learner.resources",
                f"{lc.num_learners} learners x {per} {res!r} = {lc.num_learners * per}, but the cluster has "
                f"{have.get(res, 0)} (nodes carry it with ray start --resources '{{\"{res}\": N}}').",
                "start nodes with that resource, or drop it from learner.resources",
            )


def build_actors(
    ray, cfg: Config, prompts: list[list[int]], model_dir: str, targets: list[list[int]] | None = None,
    pg=None,
):  # fmt: skip
    """The buffers (the replay buffer's `buffer.shards` actors as one `ReplayShards`), the rollout
    workers (each with its prompt shard) and the learner ranks (in `pg`, a learner placement group, made
    when None); the last item returned holds the prompt shards' refs, which the caller keeps for the whole
    run."""
    from sm_dist.buffer.replay import ReplayBuffer

    r = cfg.rollout
    replay = build_replay(ray, cfg)
    Buf = ray.remote(num_cpus=0)(ReplayBuffer)
    expert = Buf.remote(str(Path(cfg.run.run_dir) / "expert"), 10**9, 1 << 40, cfg.run.seed + 1)
    W = worker_class(ray, cfg)
    names = [f"w{i}" for i in range(r.num_workers)]
    shards = [shard(ray, cfg, prompts, targets, i, r.num_workers) for i in range(r.num_workers)]
    workers = [
        make_worker(W, cfg, names[i], model_dir, shards[i], replay, expert, seed=cfg.run.seed + i)
        for i in range(r.num_workers)
    ]
    refs = ([s.ref for s in shards], [s.targets_ref for s in shards])
    return replay, expert, workers, names, build_learners(ray, cfg, model_dir, pg), refs


def build_replay(ray, cfg: Config):
    """The replay buffer: `buffer.shards` `ReplayBuffer` actors, each with its share of the capacity and
    its own folder (sm_dist/buffer/shards.py); each restores what its folder holds. Created before the
    expert buffer, so with one shard the replay buffer stays the first ReplayBuffer actor of a run."""
    from sm_dist.buffer.replay import ReplayBuffer
    from sm_dist.buffer.shards import ReplayShards, shard_dirs

    b, run_dir, s = cfg.buffer, cfg.run.run_dir, cfg.buffer.shards
    Buf = ray.remote(num_cpus=0)(ReplayBuffer)
    rows, nbytes = b.capacity_rows // s, b.capacity_bytes // s
    handles = [
        Buf.remote(run_dir, rows, nbytes, cfg.run.seed + 1000 * k, shard=None if s == 1 else k)
        for k in range(s)
    ]
    return ReplayShards(ray, handles, shard_dirs(run_dir, s), seed=cfg.run.seed)


def worker_class(ray, cfg: Config):
    """`RolloutWorker` as a Ray actor class with the run's resources."""
    from sm_dist.rollout.worker import RolloutWorker

    r = cfg.rollout
    return ray.remote(
        num_cpus=r.cpus_per_worker,
        num_gpus=r.gpus_per_worker,
        runtime_env={"env_vars": vllm_env(r.engine.cpu_kvcache_gib)},
        max_concurrency=2
        if cfg.sync.transport.collective
        else 1,  # a stage runs beside the batch it waits for
        max_restarts=r.max_restarts,  # Ray re-runs the constructor; the driver re-sends the weights
    )(RolloutWorker)


def shard(ray, cfg: Config, prompts: list, targets: list | None, i: int, n: int):
    """Worker i of n's `PromptShard` (every n-th prompt from the i-th), by reference: small creation
    arguments survive a restart; the caller holds the refs for the whole run, so a restarted worker
    can still read its prompts."""
    from sm_dist.rollout.worker import PromptShard

    corr = cfg.rollout.correction_rows and targets is not None  # expert targets travel only when used
    return PromptShard(ray.put(prompts[i::n]), ray.put(targets[i::n]) if corr else None)


def make_worker(W, cfg: Config, name: str, model_dir: str, prompt_shard, replay, expert, seed: int):
    """One rollout worker actor (its constructor runs in the background: wait on `version`), writing to
    the replay shard its name hashes to (`replay`: the `ReplayShards`)."""
    from sm_dist.rollout.engine import RolloutParams

    r = cfg.rollout
    params = RolloutParams(
        temperature=r.temperature, top_p=r.top_p, max_actions=r.max_actions, max_backspaces=r.max_backspaces,
        samples_per_prompt=r.samples_per_prompt, seed=cfg.run.seed,
    )  # fmt: skip
    corr = prompt_shard.targets_ref is not None
    return W.remote(
        name, model_dir, prompt_shard, params, r.batch_size, sink=replay.for_worker(name),
        data_sink=expert if corr else None, engine=r.engine, transport=cfg.sync.transport,
        seed=seed, dtype=cfg.model.dtype, sync_timeout_s=cfg.sync.timeout_s,
    )  # fmt: skip


class LearnerRanks(list):
    """The learner actors in rank order, with where their process group met (`rendezvous`,
    "address:port" on rank 0's node)."""

    rendezvous: str | None = None


def learner_bundle(cfg: Config) -> dict[str, float]:
    """What one learner rank reserves: its CPUs, GPUs (if any) and the config's custom resources."""
    lc = cfg.learner
    bundle = {"CPU": lc.cpus_per_learner, "GPU": lc.gpus_per_learner, **lc.resources}
    return {k: v for k, v in bundle.items() if v > 0}


def learner_placement(ray, cfg: Config):
    """A placement group of one bundle per learner rank (learner.placement_strategy, PACK by default:
    the ranks share as few nodes as the cluster allows), reserved before any rank starts. Rollout
    workers are placed on their own, outside it, so they can scale independently."""
    from ray.util.placement_group import placement_group

    lc = cfg.learner
    bundle = learner_bundle(cfg)
    pg = placement_group([dict(bundle) for _ in range(lc.num_learners)], strategy=lc.placement_strategy)
    if not pg.wait(timeout_seconds=cfg.run.startup_timeout_s):
        ray.util.remove_placement_group(pg)
        raise ConfigError(
            "learner.resources",
            f"the cluster could not place {lc.num_learners} learner bundles {bundle} "
            f"(learner.placement_strategy={lc.placement_strategy}) within run.startup_timeout_s="
            f"{cfg.run.startup_timeout_s}s; it has {ray.available_resources()} free.",
            "start nodes that carry these resources (ray start --resources ...), lower "
            "learner.num_learners / learner.cpus_per_learner / learner.gpus_per_learner, or use "
            "learner.placement_strategy=SPREAD",
        )
    return pg


def build_learners(ray, cfg: Config, model_dir: str, pg=None) -> LearnerRanks:
    """The learner ranks (one torch.distributed group), with weights from `model_dir`, one per bundle of
    `pg` (`learner_placement`; made here when None). Every rank loads its model at once; then rank 0
    picks its own node's address and a port free there, and every rank joins it (`Learner.join`)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from sm_dist.learner.calls import rendezvous_address
    from sm_dist.learner.learner import Learner

    lc = cfg.learner
    pg = pg or learner_placement(ray, cfg)
    env = {"env_vars": vllm_env(cfg.rollout.engine.cpu_kvcache_gib)}
    L = ray.remote(
        num_cpus=lc.cpus_per_learner, num_gpus=lc.gpus_per_learner, resources=lc.resources or None,
        runtime_env=env,
    )(Learner)  # fmt: skip
    ranks = LearnerRanks(
        L.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank))
        .remote(rank, lc.num_learners, model_dir, lc, cfg.objective, cfg.run.total_steps, cfg.run.seed,
                sync=cfg.sync, model=cfg.model)
        for rank in range(lc.num_learners)
    )  # fmt: skip
    labels = [f"learner rank {i}" for i in range(len(ranks))]
    timeout = cfg.run.startup_timeout_s
    meet = ranks[0].__ray_call__.remote(rendezvous_address, lc.master_port)  # run in rank 0's process
    addr, port = _wait(ray, [meet], labels[:1], timeout)[0]
    ranks.rendezvous = f"{addr}:{port}"
    where = ray.util.get_node_ip_address()
    log.info(f"learner ranks rendezvous at {ranks.rendezvous} (rank 0's node; the driver is on {where})")
    _wait(ray, [lr.join.remote(addr, port, timeout) for lr in ranks], labels, timeout)
    return ranks


def _wait(ray, futs: list, labels: list[str], timeout_s: float) -> list:
    """Their results, for start-up calls. The first error raises at once, naming its actor (when one
    rank of a group fails, the others would wait for it until their own timeout); past `timeout_s` the
    late ones are named."""
    deadline, pending = time.monotonic() + timeout_s, list(futs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            late = [lb for f, lb in zip(futs, labels, strict=True) if f in pending]
            raise ActorStartError(
                "run.startup_timeout_s",
                f"start-up timed out after {timeout_s}s: {late} not ready ({len(futs) - len(late)}/{len(futs)} were).",
                "raise run.startup_timeout_s, or check that the cluster has the resources they wait for (ray status)",
            )  # fmt: skip
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as e:
            who = labels[futs.index(ready[0])]
            log.debug(f"{who} failed to start:\n{e}")  # the actor's own traceback, in driver.log now
            ray.wait(pending, num_returns=len(pending), timeout=5.0)  # the others' errors and output land too
            raise ActorStartError(
                who,
                f"failed to start: {describe_error(e)}",
                "check the settings it was given (rollout.engine.*, model.dir, learner.*) against the "
                "library's limits; its traceback is in run_dir/driver.log, its output in run_dir/workers.log "
                "(--debug shows the driver's)",
            ) from e
    return ray.get(list(futs))


def wait_ready(ray, cfg: Config, workers, names, learners) -> float:
    """Block until every actor has finished its constructor (vLLM engines built, models loaded), so
    the loop, its clock and the staleness bound start with every worker able to generate; return the
    seconds it took. A constructor error is re-raised naming the actor; a timeout names the late ones."""
    from sm_dist.learner.calls import step

    t0 = time.perf_counter()
    futs = [w.version.remote() for w in workers] + [lr.__ray_call__.remote(step) for lr in learners]
    labels = [f"rollout worker {n}" for n in names] + [f"learner rank {i}" for i in range(len(learners))]
    nw, nl = len(workers), len(learners)
    log.info(f"starting {nw} rollout worker{'s' * (nw != 1)} and {nl} learner rank{'s' * (nl != 1)} ...")
    _wait(ray, futs, labels, cfg.run.startup_timeout_s)
    return time.perf_counter() - t0


def describe_error(err: BaseException) -> str:
    """One line: the error (for a Ray task error, its cause) and the actor class that died, if any."""
    import re

    cause = getattr(err, "cause", None) or err
    first = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), "")
    died = re.search(r"class_name: (\w+)", str(err))
    # a constructor's error travels as text inside Ray's message: its own last "XError: ..." line says it
    text = str(err)
    raised = list(re.finditer(r"^\s*((?:\w+\.)*\w*(?:Error|Exception): .+)$", text, flags=re.M))
    if raised and cause is err:  # with the lines that continue it (a pydantic error's reasons)
        rest = text[raised[-1].end() :].splitlines()[1:4]
        what = " ".join([raised[-1][1].strip(), *(ln.strip() for ln in rest if ln.strip())])
    else:
        what = f"{type(cause).__name__}: {first}"
    return what[:400] + (f" [dead actor: {died.group(1)}]" if died else "")
