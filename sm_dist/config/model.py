"""`model`: the policy model, its tiny fallback shape and LoRA."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sm_dist.config.base import VLLM_CPU_HEAD_SIZES, Section


class TinyModelConfig(Section):
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


class LoraSettings(Section):
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


class ModelConfig(Section):
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
