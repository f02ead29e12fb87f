"""`rollout`: the rollout workers (vLLM, backspace-aware), their sampling caps, restarts and autoscaling."""

from __future__ import annotations

from pydantic import Field

from sm_dist.config.base import Section


class EngineConfig(Section):
    """vLLM engine settings of each rollout worker."""

    max_model_len: int = Field(256, ge=8, description="Context length (prompt + actions).")
    gpu_memory_utilization: float = Field(
        0.5, gt=0.0, le=1.0, description="vLLM GPU memory fraction (GPU only)."
    )
    enforce_eager: bool = Field(True, description="No CUDA graphs/compilation (fast start; needed on CPU).")
    enable_prefix_caching: bool = Field(True, description="Makes the re-prefill after a <bkspc> cheap.")
    max_num_seqs: int = Field(64, ge=1, description="Concurrent sequences in the engine.")
    cpu_kvcache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for the CPU build (GiB).")


class RolloutConfig(Section):
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
