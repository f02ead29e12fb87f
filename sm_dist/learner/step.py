"""One learner step in pure torch (no Ray, no pydantic): forward, objective, backward; and its inputs:
buffer rows as traces (`to_traces`), the config's sections as frozen `StepParams` (`objective_params`),
the LR schedule (`lr_factor`).

This is what the Learner actor calls and what runs on a bare GPU machine for checks and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sm_dist.core.forward import (
    AttnBackend,
    attention_impl,
    attn_implementation,
    masked_logits,
    masked_scores,
)
from sm_dist.core.head_loss import HeadTargets, forward_head_scores, plain_head
from sm_dist.core.objective import ObjectiveParams, raise_if_not_finite, training_loss
from sm_dist.core.traces import TraceInputs, build_inputs, collate

if TYPE_CHECKING:  # the config's sections, read by attribute (no pydantic import here)
    from sm_dist.config import LearnerConfig, ObjectiveConfig


@dataclass(frozen=True)
class StepParams:
    """The schedule and numerics of a step (plain values; the learner builds them from the config)."""

    objective: ObjectiveParams
    warmup_steps: int = 0
    sm_lambda: float = 1.0
    attn: AttnBackend = "auto"
    autocast_dtype: torch.dtype | None = None  # torch.bfloat16 on GPU
    pad_to_multiple: int = 1
    loss_chunk_size: int = 512  # positions per LM-head chunk (sm_dist.core.head_loss); 0: full logits
    pack: bool = False  # several traces a row, each its own segment
    pack_length: int = 0  # inputs per packed row (0: twice the longest trace; never below the longest)


def lr_factor(step: int, p: LearnerConfig, total_steps: int | None) -> float:
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at `total_steps` (or constant)."""
    if step < p.lr_warmup_steps:
        return (step + 1) / p.lr_warmup_steps
    if p.schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError("a cosine schedule needs total_steps; with total_steps=None use schedule='constant'")
    span = max(1, total_steps - p.lr_warmup_steps)
    frac = min(1.0, (step - p.lr_warmup_steps) / span)
    return p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def objective_params(o: ObjectiveConfig, lc: LearnerConfig, bkspc_id: int, on_gpu: bool) -> StepParams:
    """The one place the config becomes the pure-torch step's frozen parameters."""
    return StepParams(
        objective=o.params(bkspc_id),
        warmup_steps=o.warmup_steps,
        sm_lambda=o.sm_lambda,
        attn=lc.attn,
        autocast_dtype=torch.bfloat16 if (on_gpu and lc.bf16_autocast) else None,
        pad_to_multiple=8 if on_gpu else 1,
        loss_chunk_size=lc.loss_chunk_size,
        pack=lc.pack,
        pack_length=lc.pack_length,
    )  # fmt: skip


def to_traces(rows: list[dict], bkspc_id: int, eos_id: int, vocab_size: int) -> list[TraceInputs]:
    """Buffer rows -> single-pass layouts; data rows carry their noise flags (`is_noise`: none stored,
    none masked), model rows none."""
    out = []
    for r in rows:
        is_data = r["source"] == "data"
        acts = list(r["action_ids"])
        flags = list(r.get("is_noise") or []) if is_data else []
        out.append(
            build_inputs(
                r["prompt_ids"], acts, bkspc_id, eos_id=eos_id, vocab_size=vocab_size,
                is_noise=flags or None, from_data=is_data,
            )
        )  # fmt: skip
    return out


def as_rows(rows) -> list[dict]:
    """list[dict] | pa.RecordBatch | pa.Table | None -> list of dict rows."""
    if rows is None:
        return []
    if isinstance(rows, list):
        return rows
    from sm_dist.buffer.schema import batch_to_rows

    return batch_to_rows(rows)


def loss_and_backward(
    model, traces: Sequence[TraceInputs], p: StepParams, step: int, loss_scale: float = 1.0
) -> dict[str, float]:
    """Forward all `traces` in one masked pass, compute the scheduled loss, backpropagate.

    `loss_scale` divides the loss for gradient accumulation (1 / number of micro-batches). Raises
    FloatingPointError on a non-finite loss (after backward: the caller must not step the optimizer).
    """
    batch = collate(traces, pad_to_multiple=p.pad_to_multiple, pack=p.pack, pack_length=p.pack_length)
    dev = next(model.parameters()).device
    batch = batch.to(dev)
    autocast = torch.autocast(dev.type, dtype=p.autocast_dtype, enabled=p.autocast_dtype is not None)
    # the attention implementation stays set through backward (activation checkpointing reruns layers)
    with attn_implementation(model, attention_impl(batch, p.attn)):
        with autocast:
            if p.loss_chunk_size > 0 and plain_head(model) is not None:  # the head chunk by chunk, on
                # the states only; a wrapped head (PEFT under LoRA) or post-processed logits: full logits
                logits = masked_scores(model, batch, p.objective.bkspc_id, p.attn, p.loss_chunk_size)
            else:
                logits = masked_logits(model, batch, attn=p.attn)
        loss, metrics = training_loss(
            logits, batch, p.objective, step, p.warmup_steps, p.sm_lambda, check_finite=False
        )
        # Backward is queued before any host sync; a non-finite loss is reported after it, before the
        # optimizer step, which the caller then skips (gradients are discarded with zero_grad).
        (loss * loss_scale).backward()
    raise_if_not_finite(loss, logits, metrics)
    out = {k: float(v) for k, v in metrics.items()}
    out["perf/tokens"] = float(batch.lengths.sum())
    out["perf/rows"] = float(batch.input_ids.shape[0])
    out["perf/padded_tokens"] = float(batch.input_ids.numel())
    return out


def mle_loss_and_backward(model, input_ids: torch.Tensor, gamma: float = 1.0, chunk: int = 0) -> float:
    """The MLE step the benchmark compares against: HF's causal LM pass, gamma^t-weighted cross-entropy,
    backward. `chunk` > 0 runs the LM head and the cross-entropy over chunks of positions
    (`sm_dist.core.head_loss`, CE = logsumexp - l(target)), the treatment the anchors give their MLE
    step (prime-rl, SkyRL); 0: full fp32 logits."""
    R, N = input_ids.shape
    tgt = input_ids[:, 1:]
    w = gamma ** torch.arange(N - 1, device=tgt.device, dtype=torch.float32)
    if chunk > 0:
        pos = torch.arange(R * N, device=tgt.device).view(R, N)[:, :-1].reshape(-1)
        t = HeadTargets(pos, tgt.reshape(-1), torch.zeros_like(pos, dtype=torch.bool), 0)
        lse, q = forward_head_scores(model, lambda: model(input_ids=input_ids, use_cache=False), t, chunk)
        ce = (lse - q).view(R, N - 1)
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none"
        ).view_as(tgt)
    loss = (ce * w).sum(1).mean()
    loss.backward()
    return float(loss.detach())
