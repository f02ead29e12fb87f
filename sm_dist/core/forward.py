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

from sm_dist.core.head_loss import DEFAULT_CHUNK, HeadTargets, forward_head_scores
from sm_dist.core.masks import dense_mask, flex_block_mask
from sm_dist.core.objective import StateScores
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
def attn_implementation(model, impl: str | None):
    """Temporarily switch the model's attention implementation (HF `config._attn_implementation`);
    None: keep the model's own."""
    old = model.config._attn_implementation
    if impl is None or old == impl:
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def _pick_attn(attn: AttnBackend, dev: torch.device, n_inputs: int) -> AttnBackend:
    if attn != "auto":
        return attn
    if dev.type == "cuda":
        return "flex"
    return "sdpa" if n_inputs <= CPU_DENSE_MAX_LEN else "split"


def attention_impl(batch: TraceBatch, attn: AttnBackend = "auto") -> str | None:
    """The attention implementation `masked_forward` runs `batch` under (registered here), or None for
    the model's own (the plain causal path). Training with activation checkpointing must keep it set
    through backward, where each layer's forward runs again: `with attn_implementation(model, impl)`
    around forward and backward (`sm_dist.learner.step` does)."""
    attn = _pick_attn(attn, batch.input_ids.device, batch.input_ids.shape[1])
    if not batch.any_backspace and batch.seg_start is None:
        return None
    if attn == "split":
        from sm_dist.core.split_attn import SPLIT_IMPL, register_split

        register_split()
        return SPLIT_IMPL
    if attn == "flex":
        _register_flex()
        return FLEX_IMPL
    if attn == "sdpa":
        return "sdpa"
    raise ValueError(f"attn={attn!r}: use 'sdpa', 'flex', 'split' or 'auto'")


def masked_forward(model, batch: TraceBatch, attn: AttnBackend = "auto"):
    """The HF model's output on the batch's rows, in one forward pass (`batch` on the model's device).

    `auto` picks FlexAttention on CUDA (measured; `split` is the candidate to replace it once measured
    on a GPU, see benchmarks/gpu_check.sh). On the CPU (where FlexAttention runs an unfused reference
    path and has no backward) it picks the dense mask up to `CPU_DENSE_MAX_LEN` inputs and `split`
    beyond: measured SequenceMatch/MLE step ratios, dense vs split, 1.02-1.03 vs 1.04-1.10 at 256
    inputs, 1.07 vs 1.07 at 512, 1.13-1.39 vs 1.01-1.04 at 1024 (O(N^2) mask memory vs O(N * deleted)).
    Packed rows always take a mask (segments must not see each other).
    """
    _check_vocab(model, batch)
    dev = batch.input_ids.device
    impl = attention_impl(batch, attn)
    seg = batch.seg_start
    with attn_implementation(model, impl):
        if impl is None:  # plain causal path: right padding needs no mask (pads come after every real token)
            return model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        if impl == "sm_split":
            from sm_dist.core.split_attn import split_forward

            return split_forward(model, batch.input_ids, batch.position_ids, batch.deleted_at, seg)
        if impl == "sdpa":
            mask = dense_mask(batch.deleted_at, seg)
        else:
            if dev.type == "cpu" and torch.is_grad_enabled():
                raise ValueError(
                    "attn='flex': FlexAttention has no backward pass on the CPU; train with attn='split' "
                    "or attn='sdpa' (learner.attn=auto picks one of them on the CPU)"
                )
            mask = flex_block_mask(batch.deleted_at, seg_start=seg)
        return model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False
        )


def masked_logits(model, batch: TraceBatch, attn: AttnBackend = "auto") -> torch.Tensor:
    """Logits [R, N, V] (fp32) of the batch's rows, in one forward pass (see `masked_forward`)."""
    dev = next(model.parameters()).device
    return masked_forward(model, batch.to(dev), attn).logits.float()


def state_targets(batch: TraceBatch, bkspc_id: int) -> tuple[HeadTargets, torch.Tensor]:
    """The head's targets for the objective: the real states s_0 .. s_{T_b} of each sequence, the
    action taken there (none at s_{T_b}), `<bkspc>` excluded at the prompt boundary; and the [B, T+1]
    mask of those states (to scatter the scores back)."""
    real = batch.real_states()
    acts = torch.nn.functional.pad(batch.actions, (0, 1))  # [B, T+1], 0 after the last action
    return HeadTargets(
        flat_index=batch.flat_state_index()[real],
        actions=acts[real],
        exclude=(~batch.bkspc_allowed)[real],
        excluded_id=bkspc_id,
    ), real


def masked_scores(
    model, batch: TraceBatch, bkspc_id: int, attn: AttnBackend = "auto", chunk: int = DEFAULT_CHUNK
) -> StateScores:
    """What the objective reads (V(s_t), l(a_t|s_t)) from one masked pass, with the LM head run chunk by
    chunk on the states only (`sm_dist.core.head_loss`): no [R, N, V] logits. Exact against
    `scores_from_logits(masked_logits(...))` up to the matmul's summation order."""
    dev = next(model.parameters()).device
    batch = batch.to(dev)
    targets, real = state_targets(batch, bkspc_id)
    lse, q = forward_head_scores(model, lambda: masked_forward(model, batch, attn), targets, chunk)
    B, T1 = real.shape
    v = torch.zeros((B, T1), dtype=torch.float32, device=dev).masked_scatter(real, lse)
    q_all = torch.zeros((B, T1), dtype=torch.float32, device=dev).masked_scatter(real, q)
    return StateScores(v=v, q=q_all[:, : T1 - 1])


def forward_traces(
    model, traces: Sequence[TraceInputs], attn: AttnBackend = "auto", pack: bool = False
) -> list[torch.Tensor]:
    """fp32 logits [n_i, V] at every input position of each trace, from one batched masked pass
    (`pack`: several traces a row, each its own segment)."""
    batch = collate(traces, pack=pack)
    logits = masked_logits(model, batch, attn=attn)
    out = []
    for b, n in enumerate(batch.lengths):
        r = int(batch.row[b])  # type: ignore[index]
        off = int(batch.state_index[b, 0]) - int(traces[b].state_index[0])  # the trace's first input
        out.append(logits[r, off : off + int(n)])
    return out


def _check_vocab(model, batch: TraceBatch) -> None:
    n_out = model.get_output_embeddings().weight.shape[0]
    hi = int(torch.maximum(batch.input_ids.max(), batch.actions.max()))
    if hi >= n_out:
        raise ValueError(
            f"token id {hi} is outside the model's vocabulary (LM head has {n_out} rows); "
            "was the tokenizer extended (e.g. with <bkspc>) without resizing the model?"
        )
