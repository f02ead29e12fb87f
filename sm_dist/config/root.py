"""`Config`: one config describes a whole run; its cross-section checks."""

from __future__ import annotations

from pydantic import Field, model_validator

from sm_dist.config.base import Section
from sm_dist.config.data import DataConfig
from sm_dist.config.learner import LearnerConfig
from sm_dist.config.model import ModelConfig
from sm_dist.config.objective import ObjectiveConfig
from sm_dist.config.rollout import RolloutConfig
from sm_dist.config.run import BufferConfig, RunConfig, SyncConfig


class Config(Section):
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
                f"{self.sync.transport.kind} cannot take mid-run. Fix: sync.transport.kind=object_store, or max_workers=null"
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
                "base weights. Fix: sync.transport.kind=object_store (merged weights), or model.lora.r=0"
            )

    def split_batch(self) -> tuple[int, int]:
        """(replay rows, data rows) of one full step, all ranks together."""
        n_rep = round(self.learner.batch_size * self.buffer.replay_fraction)
        return n_rep, self.learner.batch_size - n_rep
