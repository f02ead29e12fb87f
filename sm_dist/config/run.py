"""`buffer`, `sync` and `run`: the replay buffer, the weight sync, and the run itself."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sm_dist.config.base import Section, by_kind
from sm_dist.sync.config import ObjectStoreConfig, TransportConfig


class BufferConfig(Section):
    """Replay buffer actors (Arrow, FIFO, persisted under `<run_dir>/buffer`; sm_dist/buffer/shards.py)."""

    capacity_rows: int = Field(
        50_000, ge=1, description="FIFO capacity in rows (data + model), all shards together."
    )
    capacity_bytes: int = Field(1 << 30, ge=1, description="FIFO capacity in bytes, all shards together.")
    shards: int = Field(
        1,
        ge=1,
        description="Replay-buffer actors. 1: one, in <run_dir>/buffer. S > 1: shard k in "
        "<run_dir>/buffer/shard-<k>, each holding capacity_rows // S rows and capacity_bytes // S bytes "
        "(its own FIFO and manifest); a rollout worker writes to the shard a hash of its id picks; with S a "
        "multiple of learner.num_learners, rank r samples shards r, r + num_learners, ... first, else every "
        "rank samples all. A run keeps its S: a resume with another is refused.",
    )
    max_staleness: int = Field(
        4, ge=0, description="Sample model rows with policy_version >= current - max_staleness."
    )
    replay_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Fraction of each batch from model rollouts (once there are any)."
    )
    newest_first: bool = Field(False, description="Sample the newest model rows instead of uniformly.")
    wait_for_replay: bool = Field(
        True,
        description="After objective.warmup_steps, a step waits until enough fresh model rows exist "
        "(bounded staleness); false: take what there is (see fill_with_data).",
    )
    fill_with_data: bool = Field(
        True,
        description="When fewer model rows than the batch's replay share are at hand (before the first "
        "rollouts, in the BC warmup, or with wait_for_replay=false), fill the batch with data rows; false: "
        "every step takes exactly batch_size - replay share data rows (the batch is smaller instead), so "
        "a comparison with MLE holds the expert rows per step fixed (DESIGN §1).",
    )


class SyncConfig(Section):
    """Weight sync learner -> rollout workers (DESIGN §4)."""

    transport: TransportConfig = Field(
        default_factory=ObjectStoreConfig,
        description="Weight transport, by `kind` (a bare name works too: `transport: gloo`): object_store "
        "(Ray object store, any cluster); gloo (a collective broadcast from learner rank 0, CPU); nccl "
        "(vLLM's NCCL weight-transfer engine, GPU learners and workers, learner.strategy=ddp; `packed`).",
    )
    every: int = Field(5, ge=1, description="Publish weights every K learner steps.")
    timeout_s: float = Field(300.0, gt=0.0, description="Timeout of one sync (raises, naming the worker).")

    _transport = by_kind("sync.transport", TransportConfig)


class RunConfig(Section):
    """The run: where it writes, how long, checkpoints, seed, cluster."""

    run_dir: str = Field("runs/tiny-cpu", description="Output folder: checkpoints, metrics, buffer, config.")
    overwrite: bool = Field(
        False,
        description="A fresh run on a run_dir that already holds one (checkpoints or metrics) is refused; "
        "true moves the old run aside to <run_dir>.old-<time> (never deleted) and starts anew.",
    )
    total_steps: int | None = Field(
        100,
        ge=1,
        description="Learner steps; null: run as a service until stopped (SIGINT/SIGTERM end it with a final "
        "checkpoint), which needs learner.schedule=constant.",
    )
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every K steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept.")
    seed: int = Field(0, description="Global seed.")
    log_every: int = Field(1, ge=1, description="Write metrics every K steps.")
    address: str | None = Field(
        None, description="Ray address to join (also RAY_ADDRESS / --address); null: start a local Ray."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the local Ray (null: this machine's count)."
    )
    progress: bool = Field(True, description="Show a tqdm progress bar.")
    eval_path: str | None = Field(
        None,
        description="Held-out (prompt, answer) jsonl or parquet: its exact-match accuracy (search decoding, the "
        "rollout workers' engines) is measured before the first step and after the last, shown in the end "
        "summary as before -> after and written to summary.json; null: not measured.",
    )
    eval_limit: int | None = Field(
        None, ge=1, description="Only the first N rows of run.eval_path (null: all)."
    )
    wandb_project: str | None = Field(
        None,
        description="Also log metrics to Weights & Biases under this project (needs `pip install wandb`).",
    )
    wandb_entity: str | None = Field(None, description="W&B entity (team or user); null: your default.")
    wandb_mode: Literal["online", "offline"] = Field(
        "online", description="W&B mode; offline writes <run_dir>/wandb for a later `wandb sync`."
    )
    startup_timeout_s: float = Field(
        900.0,
        gt=0.0,
        description="How long the learners and rollout workers (vLLM engines) may take to start.",
    )
    stop_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="After SIGTERM/SIGINT (`ray job stop`), the most seconds the final checkpoint may take; "
        "past it the driver gives up on it (the last periodic one stands). Keep the job's "
        "RAY_JOB_STOP_WAIT_TIME_S above it (deploy/ sets 900).",
    )
    asynchronous: bool = Field(
        True, description="Workers generate while learners step; false alternates them (benchmark baseline)."
    )
    api_host: str = Field(
        "127.0.0.1",
        description="Address the control API binds (GET /health /status /metrics, POST /scale /pause /resume "
        "/checkpoint /stop); 0.0.0.0 exposes it to the network (mutating calls still need the bearer token).",
    )
    api_port: int | None = Field(
        0,
        ge=0,
        le=65535,
        description="Control API port; 0: a free one (written to <run_dir>/api.json); null: no API.",
    )


def step_limit(run) -> float:
    """run.total_steps (`run`: the run section), or infinity for a run that goes on until it is stopped
    (total_steps: null)."""
    return float("inf") if run.total_steps is None else run.total_steps
