"""One masked forward pass over a batch of backspace traces, for HF causal LMs (DESIGN §2).

Supported: any HF causal LM whose forward takes `position_ids` and passes a 4-D mask (tensor or
FlexAttention BlockMask) through unchanged, which transformers 5.x does for Llama, Qwen2, GPT-2 and
most decoder models. `attn="sdpa"` uses a dense [B,1,N,N] bool mask (portable; O(N^2) memory),
`attn="flex"` a block-sparse BlockMask, `attn="split"` causal SDPA over the surviving inputs plus a
small masked SDPA for the deleted ones, on inputs permuted once (`sm_dist.core.split_attn`). A batch with no backspace takes
the plain causal path.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Literal

import torch

from sm_dist.core.masks import dense_mask, flex_block_mask
from sm_dist.core.traces import TraceBatch, TraceInputs, collate

AttnBackend = Literal["sdpa", "flex", "split", "auto"]
FLEX_IMPL = "sm_flex"  # transformers' flex_attention_forward, registered under our own name
CPU_DENSE_MAX_LEN = 512  # `auto` on the CPU: dense mask up to this many inputs, split beyond


def _register_flex() -> None:
    """Register FlexAttention as a custom attention function.

    Under its own name it skips transformers' per-architecture flex allow-list (GPT-2 is not on it,
    although its attention goes through the same interface); we always pass a ready BlockMask, so
    no mask-creation function is needed.
    """
    from transformers import AttentionInterface
    from transformers.integrations.flex_attention import flex_attention_forward

    AttentionInterface.register(FLEX_IMPL, flex_attention_forward)


@contextmanager
def attn_implementation(model, impl: str):
    """Temporarily switch the model's attention implementation (HF `config._attn_implementation`)."""
    old = model.config._attn_implementation
    if old == impl:
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def masked_logits(model, batch: TraceBatch, attn: AttnBackend = "auto") -> torch.Tensor:
    """Logits [B, N, V] (fp32) of the traces in `batch`, in one forward pass.

    `auto` picks FlexAttention on CUDA (measured; `split` is the candidate to replace it once measured
    on a GPU, see benchmarks/gpu_check.sh). On the CPU (where FlexAttention runs an unfused reference
    path and has no backward) it picks the dense mask up to `CPU_DENSE_MAX_LEN` inputs and `split`
    beyond: measured SequenceMatch/MLE step ratios, dense vs split, 1.02-1.03 vs 1.04-1.10 at 256
    inputs, 1.07 vs 1.07 at 512, 1.13-1.39 vs 1.01-1.04 at 1024 (O(N^2) mask memory vs O(N * deleted)).
    """
    _check_vocab(model, batch)
    dev = next(model.parameters()).device
    batch = batch.to(dev)
    if attn == "auto":
        if dev.type == "cuda":
            attn = "flex"
        else:
            attn = "sdpa" if batch.input_ids.shape[1] <= CPU_DENSE_MAX_LEN else "split"
    if not batch.any_backspace:
        # Plain causal path: right padding needs no mask (pads come after every real token).
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        return out.logits.float()
    if attn == "split":
        from sm_dist.core.split_attn import SPLIT_IMPL, register_split, split_forward

        register_split()
        with attn_implementation(model, SPLIT_IMPL):
            out = split_forward(model, batch.input_ids, batch.position_ids, batch.deleted_at)
        return out.logits.float()
    if attn == "sdpa":
        impl, mask = "sdpa", dense_mask(batch.deleted_at)
    elif attn == "flex":
        if dev.type == "cpu" and torch.is_grad_enabled():
            raise ValueError(
                "attn='flex': FlexAttention has no backward pass on the CPU; train with attn='split' "
                "or attn='sdpa' (learner.attn=auto picks one of them on the CPU)"
            )
        _register_flex()
        impl, mask = FLEX_IMPL, flex_block_mask(batch.deleted_at)
    else:
        raise ValueError(f"attn={attn!r}: use 'sdpa', 'flex', 'split' or 'auto'")
    with attn_implementation(model, impl):
        out = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False
        )
    return out.logits.float()


def forward_traces(model, traces: Sequence[TraceInputs], attn: AttnBackend = "auto") -> list[torch.Tensor]:
    """fp32 logits [n_i, V] at every input position of each trace, from one batched masked pass."""
    batch = collate(traces)
    logits = masked_logits(model, batch, attn=attn)
    return [logits[b, : int(n)] for b, n in enumerate(batch.lengths)]


def _check_vocab(model, batch: TraceBatch) -> None:
    n_out = model.get_output_embeddings().weight.shape[0]
    hi = int(torch.maximum(batch.input_ids.max(), batch.actions.max()))
    if hi >= n_out:
        raise ValueError(
            f"token id {hi} is outside the model's vocabulary (LM head has {n_out} rows); "
            "was the tokenizer extended (e.g. with <bkspc>) without resizing the model?"
        )
