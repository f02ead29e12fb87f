"""One learner step in pure torch (no Ray, no pydantic): forward, objective, backward.

This is what the Learner actor calls and what runs on a bare GPU machine for checks and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sm_dist.core.forward import AttnBackend, masked_logits
from sm_dist.core.objective import ObjectiveParams, raise_if_not_finite, training_loss
from sm_dist.core.traces import TraceInputs, collate


@dataclass(frozen=True)
class StepParams:
    """The schedule and numerics of a step (plain values; the learner builds them from the config)."""

    objective: ObjectiveParams
    warmup_steps: int = 0
    sm_lambda: float = 1.0
    attn: AttnBackend = "auto"
    autocast_dtype: torch.dtype | None = None  # torch.bfloat16 on GPU
    pad_to_multiple: int = 1


def loss_and_backward(
    model, traces: Sequence[TraceInputs], p: StepParams, step: int, loss_scale: float = 1.0
) -> dict[str, float]:
    """Forward all `traces` in one masked pass, compute the scheduled loss, backpropagate.

    `loss_scale` divides the loss for gradient accumulation (1 / number of micro-batches). Raises
    FloatingPointError on a non-finite loss (after backward: the caller must not step the optimizer).
    """
    batch = collate(traces, pad_to_multiple=p.pad_to_multiple)
    dev = next(model.parameters()).device
    batch = batch.to(dev)
    with torch.autocast(dev.type, dtype=p.autocast_dtype, enabled=p.autocast_dtype is not None):
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
    return out


def mle_loss_and_backward(model, input_ids: torch.Tensor, gamma: float = 1.0) -> float:
    """The plain HF MLE step the benchmark compares against: causal LM, cross-entropy, backward."""
    out = model(input_ids=input_ids, use_cache=False)
    logits = out.logits[:, :-1].float()
    tgt = input_ids[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none"
    )
    w = gamma ** torch.arange(tgt.shape[1], device=tgt.device, dtype=torch.float32)
    loss = (ce.view_as(tgt) * w).sum(1).mean()
    loss.backward()
    return float(loss.detach())
