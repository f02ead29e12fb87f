"""The run configuration: pydantic v2 models (loading, overrides and paths: `sm_dist.config_load`).

Imports no torch, Ray or vLLM, so a config is validated before any process starts. Every model forbids
unknown keys; every error is a `ConfigError` that names the dotted key, the bad value and the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sm_dist.errors import UserError
from sm_dist.sync.config import ObjectStoreConfig, TransportConfig, as_transport

# vLLM's CPU build supports these attention head sizes (PLATFORM.md); mirrored from sm_dist.core.tiny
# so this module stays free of torch.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ConfigError(UserError):
    """A config problem: `key` is the dotted path, the message says what is wrong and how to fix it."""

    def __init__(self, key: str, message: str, fix: str = ""):
        super().__init__(f"config error at `{key}`", message, fix)
        self.key = key


def registered(key: str, module: str, table: str, also: tuple[str, ...] = ()):
    """A field validator: the value must be a key of the registry `module.table` (imported when a
    config is validated, so this module imports no torch), or one of `also`. Adding an entry to the
    registry is all a new name needs."""

    def check(value: str) -> str:
        import importlib

        names = (*also, *getattr(importlib.import_module(module), table))
        if value not in names:
            raise ValueError(f"{key}: {value!r} is not one of {list(names)}. Fix: use one of them")
        return value

    return field_validator(key.rsplit(".", 1)[-1])(check)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ---- model ------------------------------------------------------------------------------------------


class TinyModelConfig(_Section):
    """Shape of the tiny Llama built by `sm_dist.core.tiny.make_tiny_model` when the model is missing."""

    hidden_size: int = Field(
        128, ge=32, description="Hidden width; hidden_size/num_heads must be a vLLM CPU head size."
    )
    num_layers: int = Field(2, ge=1, description="Transformer blocks.")
    num_heads: int = Field(2, ge=1, description="Attention heads.")
    seed: int = Field(0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _head_size(self):
        head, rem = divmod(self.hidden_size, self.num_heads)
        if rem or head not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"model.tiny: hidden_size={self.hidden_size} / num_heads={self.num_heads} gives head size "
                f"{self.hidden_size / self.num_heads}; vLLM's CPU attention needs one of {VLLM_CPU_HEAD_SIZES}. "
                "Fix: e.g. hidden_size=128, num_heads=2"
            )
        return self


class LoraSettings(_Section):
    """LoRA through PEFT (`sm_dist.learner.lora`): r > 0 trains low-rank adapters plus the `<bkspc>` rows of
    the embedding and LM head; the base weights stay frozen. Rollout workers get merged weights."""

    r: int = Field(0, ge=0, description="LoRA rank; 0: no LoRA (the whole model trains).")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names (suffixes) that get adapters, e.g. [q_proj, v_proj]; `all-linear`: every "
        "linear layer but the LM head (PEFT's meaning).",
    )
    bkspc_rows: Literal["trainable_tokens", "modules_to_save"] = Field(
        "trainable_tokens",
        description="How the `<bkspc>` embedding and LM-head rows train: PEFT's trainable_token_indices (that "
        "row alone; cheaper, measured by benchmarks/lora_rows.py) or the whole embedding and head in "
        "modules_to_save.",
    )


class ModelConfig(_Section):
    """The policy: an HF causal-LM folder that already has `<bkspc>` (see `sm-dist add-bkspc`)."""

    dir: str | None = Field(
        None,
        description="HF model folder (with <bkspc>); null = `<run_dir>/model`. Loaded by learner and vLLM.",
    )
    make_tiny_if_missing: bool = Field(
        False, description="Build a tiny Llama + arithmetic tokenizer at `dir` when it does not exist."
    )
    start_from: str | None = Field(
        None,
        description="When `dir` does not exist, copy this HF model folder there as the run's start model "
        "(before make_tiny_if_missing), e.g. the shipped base models/tiny-arith-base (benchmarks/make_base.py).",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Tiny model settings.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="vLLM weights dtype, and the dtype weights leave the learner in (syncs, the checkpoint's "
        "model/ folder, exports). The learner keeps float32 master weights (QLoRA: its adapters).",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA (off while lora.r is 0).")
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: the frozen base is loaded in 4 bits (bitsandbytes NF4, double quantisation, "
        "bfloat16 compute) under the LoRA adapters; needs model.lora.r > 0 and CUDA learners.",
    )


# ---- data -------------------------------------------------------------------------------------------


class DataConfig(_Section):
    """Expert (prompt, answer) data: loaded, tokenised, noise-augmented, written to the buffer once."""

    train_path: str = Field(
        "configs/data/arith/add_or_sub_in_base.train-easy.jsonl",
        description="Examples: a jsonl/parquet/text/arrow/csv file, a glob of them (data/*.parquet), a `datasets` "
        "save_to_disk folder, or a hub dataset id (owner/name, from the Hugging Face cache; see data.split, "
        "data.name); read row by row or memory-mapped, never whole. Rows with `messages` are chat rows "
        "(sm_dist.data.chat). Relative paths: see module docstring. The default is a 5,000-question sample "
        "of DeepMind's own add_or_sub_in_base files, bundled in the repo.",
    )
    split: str = Field("train", description="The split of a hub dataset or a save_to_disk DatasetDict.")
    name: str | None = Field(None, description="The configuration (subset) name of a hub dataset.")
    fallback: Literal["arith_easy", "arith_medium", "arith_hard", "none"] = Field(
        "none",
        description="If train_path is missing: 'none' stops with an error naming the fix; arith_<level> "
        "generates that arithmetic split into the run dir (it must match a split named in train_path).",
    )
    _format = registered("data.format", "sm_dist.data.datasets", "FORMATS", also=("auto",))
    fallback_size: int = Field(5000, ge=1, description="Examples generated by the fallback.")
    format: str = Field(
        "auto",
        description="File format, a key of sm_dist.data.datasets.FORMATS (jsonl, parquet, text, arrow, csv), or "
        "auto: from the suffix (.jsonl/.json, .parquet, .txt/.text, .arrow, .csv).",
    )
    text_field: str | None = Field(
        None,
        description="jsonl/parquet field holding a plain text, split into prompt (its first prompt_chars "
        "characters) and answer; null: use prompt_field/answer_field. A text file is always plain text.",
    )
    prompt_chars: int = Field(
        0, ge=0, description="Plain text: characters that form the prompt (0: empty prompt, all answer)."
    )
    prompt_field: str = Field("prompt", description="Field holding the prompt text.")
    answer_field: str = Field("answer", description="Field holding the answer text.")
    max_prompt_len: int = Field(64, ge=1, description="Prompt tokens; longer prompts follow `on_bad`.")
    max_answer_len: int = Field(
        32, ge=1, description="Answer tokens including <eos>; longer answers follow `on_bad`."
    )
    on_bad: Literal["error", "skip"] = Field(
        "skip", description="Malformed or over-long rows: raise ('error') or skip and count ('skip')."
    )
    p_noise: float = Field(
        0.1, ge=0.0, le=1.0, description="Per-position probability of a `noise, <bkspc>` pair."
    )
    noise: Literal["task", "vocab", "plausible", "model"] = Field(
        "task",
        description="Which wrong token is injected (sm_dist.data.noise): uniform over the answers' tokens "
        "('task') or the whole vocabulary ('vocab'); 'plausible': add_or_sub_in_base mistakes (a digit +-1 "
        "in the base, a sign added or dropped, a carry/borrow slip); 'model': the base model's own top-k "
        "at that state, expert token excluded, read from data.noise_path.",
    )
    noise_path: str | None = Field(
        None,
        description="data.noise=model: the candidates file written by `python -m sm_dist.data.noise` "
        "(one vLLM prompt-log-prob pass of the base model over this data).",
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many examples (null: all).")
    augment_copies: int = Field(
        1, ge=1, description="Augmented copies of each example (different noise draws)."
    )
    watch_dir: str | None = Field(
        None,
        description="A folder polled between learner steps for new expert data files (same formats and "
        "checks as train_path); each is added to the expert buffer once (null: off).",
    )
    watch_poll_s: float = Field(1.0, gt=0.0, description="Seconds between two listings of data.watch_dir.")

    @model_validator(mode="after")
    def _noise_path_for_model_noise(self):
        if self.noise == "model" and self.noise_path is None:
            raise ValueError(
                "data.noise=model needs data.noise_path; write it with "
                "`python -m sm_dist.data.noise --model BASE --data TRAIN --out FILE`"
            )
        return self


# ---- objective --------------------------------------------------------------------------------------


class ObjectiveConfig(_Section):
    """SequenceMatch objective (DESIGN §1)."""

    divergence: str = Field(
        "chi2_mixture",
        description="f-divergence, a key of sm_dist.core.objective.DIVERGENCE_SPECS (chi2_mixture, chi2, kl, js, "
        "hellinger, mle): chi2_mixture is SequenceMatch; mle is the BC baseline.",
    )
    _divergence = registered("objective.divergence", "sm_dist.core.objective", "DIVERGENCE_SPECS")
    gamma: float = Field(0.998, gt=0.0, le=1.0, description="Discount over actions.")
    chi2_weight: float = Field(
        1e-3,
        ge=0.0,
        description="c, the chi^2 term's weight in logit units. The paper's alpha = 0.01 read as IQ-Learn's "
        "soft-Q temperature (the likely reading) gives c = alpha / (4 alpha_chi) ~ 0.0025-0.005; read as "
        "c = 1/(4 alpha) (unlikely) it is 25, which destroys the policy (docs/results_same_regime.md).",
    )
    data_mix: float = Field(0.5, ge=0.0, le=1.0, description="Weight of data occupancy in the mixture E_mix.")
    mask_noise_actions: bool = Field(True, description="Do not imitate injected noise actions (state kept).")
    warmup_steps: int = Field(20, ge=0, description="BC/MLE-only steps before the SequenceMatch loss starts.")
    sm_lambda: float = Field(0.5, ge=0.0, le=1.0, description="After warmup: (1-lambda) L_BC + lambda L_SM.")
    weight_clip: float = Field(10.0, gt=0.0, description="Cap on phi'(r) weights for kl/js/hellinger.")
    bkspc_discount: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="delta: a <bkspc> transition discounts by gamma * delta (1: plain gamma). Tried against "
        "the write/delete loop (sm_dist.core.objective docstring); it does not stop it.",
    )
    truncated_value: Literal["bootstrap", "complete"] = Field(
        "bootstrap",
        description="Value term of a truncated rollout: 'bootstrap' V(s_0) - gamma^T V(s_T) (the paper); "
        "'complete' V(s_0), its whole continuation telescoped, which removes the reward for raising V "
        "where write/delete loops are cut off (sm_dist.core.objective docstring).",
    )


# ---- learner ----------------------------------------------------------------------------------------


class LearnerConfig(_Section):
    """Learner ranks (torch.distributed group), optimiser and schedule."""

    num_learners: int = Field(
        1, ge=1, description="Learner ranks (Ray actors); DDP/FSDP2 over them when > 1."
    )
    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="Data parallelism: ddp (replicated weights), or fsdp2 (parameters, gradients and "
        "optimiser state sharded over the ranks; gloo on CPU, NCCL on GPU).",
    )
    lr: float = Field(3e-4, gt=0.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR after warmup.")
    lr_warmup_steps: int = Field(10, ge=0, description="Linear LR warmup steps.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine floor as a fraction of lr.")
    batch_size: int = Field(16, ge=1, description="Sequences per optimiser step, all ranks together.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per step on each rank.")
    clip_norm: float | None = Field(1.0, description="Global grad-norm clip (null: off).")
    bf16_autocast: bool = Field(
        True, description="bf16 autocast for forward/backward on GPU (ignored on CPU)."
    )
    attn: Literal["auto", "sdpa", "flex", "split"] = Field(
        "auto",
        description="Masked-attention backend: auto (flex on CUDA; on CPU sdpa up to 512 inputs, split beyond); sdpa (dense mask); flex "
        "(FlexAttention block mask); split (causal SDPA over surviving inputs + masked SDPA for deleted ones).",
    )
    loss_chunk_size: int = Field(
        512,
        ge=0,
        description="Positions per LM-head chunk: the model body runs once, the head and the objective's "
        "logsumexp run on the states only, this many at a time, recomputed in backward (no [B, N, V] "
        "logits); 0: full fp32 logits (needed for models that post-process logits, e.g. softcapping).",
    )
    pack: bool = Field(
        True,
        description="Pack several traces into each row (each its own segment: positions restart, no "
        "attention across segments), rows as long as the longest trace; false: one trace a row, padded.",
    )
    pack_length: int = Field(
        0,
        ge=0,
        description="Inputs per packed row (learner.pack): 0 = twice the longest trace of the micro-batch "
        "(measured on arithmetic traces, CPU: 1.42x the padded step's real tokens/s); never shorter than "
        "the longest trace.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in backward (HF gradient checkpointing, "
        "non-reentrant): less memory, about one more forward of compute. DDP and FSDP2.",
    )
    cpu_offload: bool = Field(
        False,
        description="FSDP2 only: keep sharded parameters, gradients and optimiser state in CPU memory "
        "(CPUOffloadPolicy; the optimiser step runs on the CPU).",
    )
    nan_tolerance: int = Field(
        3, ge=1, description="Skip a step with a non-finite loss/grad; stop after this many in a row."
    )
    cpus_per_learner: float = Field(1.0, gt=0.0, description="Ray CPUs per learner actor.")
    gpus_per_learner: float = Field(0.0, ge=0.0, description="Ray GPUs per learner actor (0: CPU, gloo).")
    master_port: int | None = Field(
        None,
        description="torch.distributed port on learner rank 0's node (null: rank 0 picks one free there).",
    )
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How the ranks' placement group (one bundle per rank) spreads over nodes: PACK fills "
        "nodes in turn (fewest nodes, fastest collectives); STRICT_PACK needs them all on one node.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each learner rank needs besides CPUs/GPUs (e.g. {learner_node: 1} "
        "to keep the ranks on nodes started with --resources '{\"learner_node\": N}').",
    )
    max_restarts: int = Field(
        2,
        ge=0,
        description="Times the learner ranks are rebuilt after one dies (crash, OOM kill): every rank is "
        "replaced, loads the latest checkpoint (or the initial model), the weights are re-published, and "
        "the run goes on from that checkpoint's step (the steps since it are redone). object_store "
        "transport only; 0, or one death more, stops the run.",
    )

    @model_validator(mode="after")
    def _offload_needs_fsdp2(self):
        if self.cpu_offload and self.strategy != "fsdp2":
            raise ValueError(
                f"learner.cpu_offload=true needs learner.strategy=fsdp2 (got {self.strategy!r}): only FSDP2 "
                "shards what it offloads. Fix: set learner.strategy=fsdp2, or learner.cpu_offload=false"
            )
        return self


# ---- rollout ----------------------------------------------------------------------------------------


class EngineConfig(_Section):
    """vLLM engine settings of each rollout worker."""

    max_model_len: int = Field(256, ge=8, description="Context length (prompt + actions).")
    gpu_memory_utilization: float = Field(
        0.5, gt=0.0, le=1.0, description="vLLM GPU memory fraction (GPU only)."
    )
    enforce_eager: bool = Field(True, description="No CUDA graphs/compilation (fast start; needed on CPU).")
    enable_prefix_caching: bool = Field(True, description="Makes the re-prefill after a <bkspc> cheap.")
    max_num_seqs: int = Field(64, ge=1, description="Concurrent sequences in the engine.")
    cpu_kvcache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for the CPU build (GiB).")


class RolloutConfig(_Section):
    """Rollout workers (vLLM, backspace-aware)."""

    num_workers: int = Field(2, ge=1, description="Rollout worker actors; each gets a disjoint prompt shard.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="Ray CPUs per rollout worker.")
    gpus_per_worker: float = Field(0.0, ge=0.0, description="Ray GPUs per rollout worker.")
    batch_size: int = Field(16, ge=1, description="Prompts per `run_batch`.")
    samples_per_prompt: int = Field(1, ge=1, description="Rollouts per prompt.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_actions: int = Field(32, ge=1, description="Cap on actions per rollout (tokens, <bkspc>, <eos>).")
    max_backspaces: int = Field(8, ge=0, description="Cap on <bkspc> actions per rollout.")
    correction_rows: bool = Field(
        False,
        description="Self-correction data from the model's own mistakes: for each rollout that leaves its "
        "expert answer, also write an expert row to the expert buffer: the answer up to the rollout's first "
        "wrong token, that token (flagged as noise), <bkspc>, then the rest of the answer. Teaches recovery "
        "from the mistakes the model makes rather than random ones (sm_dist.core.traces.self_correction).",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="Times a dead rollout worker (crash, OOM kill) is restarted; it then loads the latest "
        "weights (object_store transport) and resumes. A worker that dies once more stops the run.",
    )
    min_workers: int = Field(
        1, ge=1, description="Autoscaling (when max_workers is set): the fewest workers."
    )
    max_workers: int | None = Field(
        None,
        ge=1,
        description="Autoscaling: keep the learner fed with between min_workers and max_workers workers, "
        "adding one when the learner waited for rollouts more than autoscale_up_wait of a window, removing "
        "one when it waited less than autoscale_down_wait and the replay buffer is at least half full, the "
        "same decision two windows in a row (null: off; object_store transport).",
    )
    autoscale_window_s: float = Field(30.0, gt=0.0, description="Autoscaling: seconds per decision window.")
    autoscale_up_wait: float = Field(
        0.2, gt=0.0, le=1.0, description="Autoscaling: learner wait fraction above which a worker is added."
    )
    autoscale_down_wait: float = Field(
        0.02, ge=0.0, le=1.0, description="Autoscaling: learner wait fraction below which one may be removed."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings.")


# ---- buffer, sync, run ------------------------------------------------------------------------------


class BufferConfig(_Section):
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


class SyncConfig(_Section):
    """Weight sync learner -> rollout workers (DESIGN §4)."""

    transport: TransportConfig = Field(
        default_factory=ObjectStoreConfig,
        description="Weight transport, by `kind` (a bare name works too: `transport: gloo`): object_store "
        "(Ray object store, any cluster); gloo (a collective broadcast from learner rank 0, CPU); nccl "
        "(vLLM's NCCL weight-transfer engine, GPU learners and workers, learner.strategy=ddp; `packed`).",
    )
    every: int = Field(5, ge=1, description="Publish weights every K learner steps.")
    timeout_s: float = Field(300.0, gt=0.0, description="Timeout of one sync (raises, naming the worker).")

    _transport_name = field_validator("transport", mode="before")(as_transport)


class RunConfig(_Section):
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


class Config(_Section):
    """One config describes a whole run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Expert data.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="Loss.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learners.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers.")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="Replay buffer.")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="Weight sync.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run settings.")

    @model_validator(mode="after")
    def _cross(self):
        self._check_batch()
        self._check_buffer()
        need = self.data.max_prompt_len + max(self.rollout.max_actions, self.data.max_answer_len * 2)
        if self.rollout.engine.max_model_len < need:
            raise ValueError(
                f"rollout.engine.max_model_len: {self.rollout.engine.max_model_len} < data.max_prompt_len "
                f"({self.data.max_prompt_len}) + max(rollout.max_actions, 2*data.max_answer_len) = {need}. "
                f"Fix: set rollout.engine.max_model_len={need} or lower the lengths"
            )
        self.sync.transport.check(self)
        self._check_autoscaling()
        if self.learner.attn == "flex" and self.learner.gpus_per_learner == 0:
            raise ValueError(
                "learner.attn: flex has no backward pass on the CPU (learner.gpus_per_learner=0). "
                "Fix: learner.attn=auto (or split / sdpa), or give the learners GPUs"
            )
        if self.run.total_steps is None and self.learner.schedule != "constant":
            raise ValueError(
                "run.total_steps: null (run until stopped) has no end for the learner.schedule="
                f"{self.learner.schedule} decay to reach. Fix: set learner.schedule=constant, or give "
                "run.total_steps a number"
            )
        self._check_lora()
        if self.model.dir is None and not self.model.make_tiny_if_missing:
            raise ValueError(
                "model.dir: null (= <run_dir>/model) needs model.make_tiny_if_missing=true. "
                "Fix: set model.dir to an HF model folder with <bkspc>"
            )
        return self

    def _check_buffer(self) -> None:
        b = self.buffer
        if b.capacity_rows < b.shards or b.capacity_bytes < b.shards:
            raise ValueError(
                f"buffer.shards: {b.shards} shards would each hold capacity_rows // shards = "
                f"{b.capacity_rows // b.shards} rows and capacity_bytes // shards = "
                f"{b.capacity_bytes // b.shards} bytes; each needs at least 1. "
                "Fix: raise buffer.capacity_rows / buffer.capacity_bytes, or lower buffer.shards"
            )

    def _check_batch(self) -> None:
        n_rep, n_dat = self.split_batch()
        m = self.learner.num_learners
        if n_rep % m or n_dat % m:
            raise ValueError(
                f"learner.batch_size: {self.learner.batch_size} sequences split into {n_dat} data + {n_rep} "
                f"replay (buffer.replay_fraction={self.buffer.replay_fraction}); each part must divide evenly "
                f"over learner.num_learners={m} so every rank normalises the same mixture. "
                f"Fix: make learner.batch_size a multiple of {2 * m}"
            )
        per_rank = (n_dat // m, n_rep // m)
        g = self.learner.grad_accum
        if per_rank[0] % g or per_rank[1] % g:
            raise ValueError(
                f"learner.grad_accum: {g} micro-batches do not split {per_rank[0]} data + {per_rank[1]} replay "
                "rows per rank evenly. Fix: make learner.batch_size a multiple of 2 * num_learners * grad_accum"
            )

    def _check_autoscaling(self) -> None:
        r = self.rollout
        if r.max_workers is not None and not r.min_workers <= r.num_workers <= r.max_workers:
            raise ValueError(
                f"rollout.max_workers: autoscaling needs min_workers ({r.min_workers}) <= num_workers "
                f"({r.num_workers}) <= max_workers ({r.max_workers}). Fix: adjust them"
            )
        if r.max_workers is not None and self.sync.transport.collective:
            raise ValueError(
                f"rollout.max_workers: autoscaling adds and removes workers, which sync.transport="
                f"{self.sync.transport.kind} cannot take mid-run. Fix: sync.transport=object_store, or max_workers=null"
            )
        if r.max_workers is not None and r.autoscale_down_wait >= r.autoscale_up_wait:
            raise ValueError(
                "rollout.autoscale_down_wait must be below rollout.autoscale_up_wait (hysteresis). Fix: e.g. 0.02 and 0.2"
            )

    def _check_lora(self) -> None:
        m = self.model
        if m.load_in_4bit and m.lora.r == 0:
            raise ValueError(
                "model.load_in_4bit: a 4-bit base cannot train itself; QLoRA trains LoRA adapters on it. "
                "Fix: set model.lora.r (e.g. model.lora.r=64)"
            )
        if m.load_in_4bit and self.learner.gpus_per_learner == 0:
            raise ValueError(
                "model.load_in_4bit: bitsandbytes' 4-bit layers need CUDA, and learner.gpus_per_learner is 0. "
                "Fix: give the learners GPUs (learner.gpus_per_learner=1), or model.load_in_4bit=false"
            )
        if m.lora.r and self.sync.transport.kind == "nccl":
            raise ValueError(
                "sync.transport: nccl sends the live module's own tensors, which under LoRA are the unmerged "
                "base weights. Fix: sync.transport=object_store (merged weights), or model.lora.r=0"
            )

    def split_batch(self) -> tuple[int, int]:
        """(replay rows, data rows) of one full step, all ranks together."""
        n_rep = round(self.learner.batch_size * self.buffer.replay_fraction)
        return n_rep, self.learner.batch_size - n_rep
