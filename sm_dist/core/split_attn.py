"""Exact `<bkspc>` attention as dense causal attention plus a small masked remainder (DESIGN §2).

The visibility rule (key k visible to query q iff k <= q < deleted_at[k]) has a structure the general
block-sparse kernel does not use: a *surviving* input (never deleted, deleted_at = +inf) sees only
surviving inputs, namely all those before it. (If a survivor q saw a key k that is deleted later, k
would lie below q on the stack; a `<bkspc>` reaches k only after popping q, so q would not survive.)

So the pass runs on the inputs *permuted once*, per row: surviving inputs first, then the deleted ones,
each group in input order (`position_ids` travel with their tokens, so RoPE / learned positions are
unchanged; every other layer is per-token). In that order, with `c` = the fewest survivors of any row:

* slots [0, c) are survivors in every row, a plain causal sequence: one `scaled_dot_product_attention`
  with `is_causal=True` on a prefix slice, which dispatches to the flash / cuDNN kernels on a GPU;
* slots [c, N) (the deleted inputs, about two per `<bkspc>`, plus the extra survivors of rows with
  fewer deletions) are queries of a second SDPA call against all N keys with a dense
  [B, 1, N - c, N] bool mask, exact for any query, `(N - c) / N` of the full cost;
* the two outputs are concatenated (no gather: the next layer works in the same permuted order), and a
  forward pre-hook on the LM head puts the final hidden states back in input order, once.

Packed rows (several traces a row, `seg_start`): the same holds inside each segment, so the causal
part becomes block-causal (a [c, c] bool mask, which loses the flash kernel on a GPU but not exactness)
and the masked part adds seg_start[q] <= k.

Pure torch; registered with transformers as the attention function `sm_split`, so any HF model whose
attention goes through `AttentionInterface` (Llama, Qwen2, GPT-2, ...) can use it, through
`split_forward` (which applies the permutation and the hook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sm_dist.core.traces import INF_POS

SPLIT_IMPL = "sm_split"


@dataclass
class SplitPlan:
    """Index tensors of one batch (all on the model's device)."""

    perm: torch.Tensor  # [B, N] input position held by each slot (survivors first, input order kept)
    inv: torch.Tensor  # [B, N] slot of each input position (perm's inverse)
    n_causal: int  # c: the leading slots that are survivors in every row
    del_mask: torch.Tensor  # [B, 1, N - c, N] bool: what the query in slot c + i sees, over slots
    causal_mask: torch.Tensor | None = None  # [B, 1, c, c] bool block-causal (packed rows), else None


def make_split_plan(deleted_at: torch.Tensor, seg_start: torch.Tensor | None = None) -> SplitPlan:
    """[B, N] deleted_at (and seg_start) -> the plan (one stable sort, gathers; one host sync, for `c`)."""
    B, N = deleted_at.shape
    surv = deleted_at >= INF_POS
    n_causal = int(surv.sum(1).min())
    perm = torch.argsort((~surv).to(torch.int8), dim=1, stable=True)
    slots = torch.arange(N, device=deleted_at.device).expand(B, N)
    inv = torch.empty_like(perm).scatter_(1, perm, slots)
    d_at = deleted_at.gather(1, perm)  # deleted_at of the input in each slot
    q = perm[:, n_causal:, None]  # input position of each masked-part query
    k = perm[:, None, :]
    del_mask = (k <= q) & (q < d_at[:, None, :])
    causal_mask = None
    if seg_start is not None:
        seg = seg_start.gather(1, perm)  # [B, N] segment start of the input in each slot
        del_mask &= k >= seg[:, n_causal:, None]
        pc = perm[:, :n_causal]
        causal_mask = ((pc[:, None, :] <= pc[:, :, None]) & (pc[:, None, :] >= seg[:, :n_causal, None]))[
            :, None
        ]
    return SplitPlan(perm, inv, n_causal, del_mask[:, None], causal_mask)


def split_mask(plan: SplitPlan) -> torch.Tensor:
    """The `attention_mask` handed through the HF model: an empty 4-D bool tensor (transformers returns
    a ready 4-D mask unchanged) carrying the plan, as `.sm_split_plan`, to `split_attention_forward`."""
    B = plan.perm.shape[0]
    m = torch.empty(B, 1, 0, 0, dtype=torch.bool, device=plan.perm.device)
    m.sm_split_plan = plan
    return m


def split_forward(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    deleted_at: torch.Tensor,
    seg_start: torch.Tensor | None = None,
):
    """The model's output for the traces (logits in input order), computed in the permuted order.
    The model's attention implementation must be `sm_split` (see `register_split`)."""
    plan = make_split_plan(deleted_at, seg_start)
    head = model.get_output_embeddings()

    def unpermute(_module, args):
        h = args[0]  # [B, N, hidden]: the final hidden states, in slot order
        return (h.gather(1, plan.inv[..., None].expand(-1, -1, h.shape[-1])), *args[1:])

    hook = head.register_forward_pre_hook(unpermute, prepend=True)  # before any other pre-hook
    try:
        return model(
            input_ids=input_ids.gather(1, plan.perm),
            position_ids=position_ids.gather(1, plan.perm),
            attention_mask=split_mask(plan),
            use_cache=False,
        )
    finally:
        hook.remove()


def split_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query [B, H, N, D], key/value [B, Hkv, N, D], all in
    the plan's slot order; returns ([B, N, H, D], None) in the same order."""
    plan: SplitPlan | None = getattr(attention_mask, "sm_split_plan", None)
    if plan is None:
        raise ValueError(
            "sm_split attention needs the mask made by sm_dist.core.split_attn.split_mask (got "
            f"{type(attention_mask).__name__}); call the model through sm_dist.core.masked_logits"
        )
    B, H, N, D = query.shape
    Hkv = key.shape[1]
    groups = H // Hkv
    drop = dropout if module.training else 0.0
    c = plan.n_causal
    parts = []
    if c > 0:  # causal part: GQA natively (enable_gqa), as transformers' SDPA path does for the MLE baseline
        cm = plan.causal_mask
        parts.append(
            F.scaled_dot_product_attention(
                query[:, :, :c], key[:, :, :c], value[:, :, :c], attn_mask=cm, is_causal=cm is None,
                dropout_p=drop, scale=scaling, enable_gqa=groups > 1,
            )
        )  # fmt: skip
    # masked part: the query heads that share a KV head are stacked along the query axis (head
    # h = kv * groups + g, transformers' repeat_kv order), so K/V are never repeated
    Lq = N - c
    q_d = query[:, :, c:].reshape(B, Hkv, groups * Lq, D)
    mask = plan.del_mask.expand(B, groups, Lq, N).reshape(B, 1, groups * Lq, N)
    out_d = F.scaled_dot_product_attention(q_d, key, value, attn_mask=mask, dropout_p=drop, scale=scaling)
    parts.append(out_d.reshape(B, H, Lq, D))
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def register_split() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SPLIT_IMPL, split_attention_forward)
