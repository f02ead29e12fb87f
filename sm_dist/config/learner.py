"""`learner`: the learner ranks (torch.distributed group), optimiser, schedule and placement."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sm_dist.config.base import Section


class LearnerConfig(Section):
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
