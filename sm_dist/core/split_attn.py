"""Exact `<bkspc>` attention as dense causal attention plus a small masked remainder (DESIGN §2).

The visibility rule (key k visible to query q iff k <= q < deleted_at[k]) has a structure the general
block-sparse kernel does not use: a *surviving* input (never deleted, deleted_at = +inf) sees only
surviving inputs. (If a survivor q saw a key k that is deleted later, k would lie below q on the
stack; a `<bkspc>` reaches k only after popping q, so q would not survive.) So:

* survivors, compacted in input order, are a plain causal sequence: one `scaled_dot_product_attention`
  with `is_causal=True`, which dispatches to the flash / cuDNN kernels on a GPU;
* the deleted inputs (about two per `<bkspc>`: the popped token and the replaced one) are the only
  queries that need the general mask: a second SDPA call with `Ld` queries against all `N` keys and a
  dense [B, 1, Ld, N] bool mask, `Ld / N` of the full cost;
* one gather puts both outputs back in input order.

Padding makes it exact for ragged batches: rows with fewer survivors fill the causal part with their
deleted inputs (after every real survivor, so invisible to them under the causal mask, and their
outputs are taken from the masked part instead); rows with fewer deleted inputs fill the masked part
with survivors, for which the general mask is also exact. Pure torch; registered with transformers as
the attention function `sm_split`, so any HF model whose attention goes through `AttentionInterface`
(Llama, Qwen2, GPT-2, ...) can use it.
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

    surv_idx: torch.Tensor  # [B, Ls] input positions of the causal part (survivors first)
    del_idx: torch.Tensor  # [B, Ld] input positions of the masked part (deleted first)
    del_mask: torch.Tensor  # [B, 1, Ld, N] bool: what each masked-part query sees
    back: torch.Tensor  # [B, N] index into cat(causal part, masked part) of each input position


def make_split_plan(deleted_at: torch.Tensor) -> SplitPlan:
    """[B, N] deleted_at -> the plan (a few sorts and cumsums; one host sync, for the two sizes)."""
    B, N = deleted_at.shape
    surv = deleted_at >= INF_POS
    n_s = surv.sum(1)
    Ls, Ld = torch.stack([n_s.max(), N - n_s.min()]).tolist()  # one host sync for both sizes
    # stable sorts keep input order within each group
    surv_first = torch.argsort((~surv).to(torch.int8), dim=1, stable=True)
    del_first = torch.argsort(surv.to(torch.int8), dim=1, stable=True)
    surv_idx, del_idx = surv_first[:, :Ls], del_first[:, : max(Ld, 1)]
    k = torch.arange(N, device=deleted_at.device)
    q = del_idx[:, :, None]
    del_mask = (k[None, None, :] <= q) & (q < deleted_at[:, None, :])
    rank_s = torch.cumsum(surv, 1) - 1
    rank_d = torch.cumsum(~surv, 1) - 1
    back = torch.where(surv, rank_s, Ls + rank_d)
    return SplitPlan(surv_idx, del_idx, del_mask[:, None], back)


def split_mask(deleted_at: torch.Tensor) -> torch.Tensor:
    """The `attention_mask` handed through the HF model: an empty 4-D bool tensor (transformers returns
    a ready 4-D mask unchanged) carrying the plan, as `.sm_split_plan`, to `split_attention_forward`."""
    B = deleted_at.shape[0]
    m = torch.empty(B, 1, 0, 0, dtype=torch.bool, device=deleted_at.device)
    m.sm_split_plan = make_split_plan(deleted_at)
    return m


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D], idx [B, L] -> [B, H, L, D]."""
    B, H, _, D = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))


def split_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query [B, H, N, D], key/value [B, Hkv, N, D];
    returns ([B, N, H, D], None)."""
    plan: SplitPlan | None = getattr(attention_mask, "sm_split_plan", None)
    if plan is None:
        raise ValueError(
            "sm_split attention needs the mask made by sm_dist.core.split_attn.split_mask (got "
            f"{type(attention_mask).__name__}); call the model through sm_dist.core.masked_logits"
        )
    B, H, _, D = query.shape
    Hkv = key.shape[1]
    groups = H // Hkv
    drop = dropout if module.training else 0.0
    # causal part: GQA natively (enable_gqa), as transformers' own SDPA path does for the MLE baseline
    out_s = F.scaled_dot_product_attention(
        _take(query, plan.surv_idx),
        _take(key, plan.surv_idx),
        _take(value, plan.surv_idx),
        is_causal=True,
        dropout_p=drop,
        scale=scaling,
        enable_gqa=groups > 1,
    )
    # masked part: the query heads that share a KV head are stacked along the query axis (head
    # h = kv * groups + g, transformers' repeat_kv order), so K/V are never repeated
    Ld = plan.del_idx.shape[1]
    q_d = _take(query, plan.del_idx).reshape(B, Hkv, groups * Ld, D)
    mask = plan.del_mask.expand(B, groups, Ld, -1).reshape(B, 1, groups * Ld, -1)
    out_d = F.scaled_dot_product_attention(q_d, key, value, attn_mask=mask, dropout_p=drop, scale=scaling)
    out_d = out_d.reshape(B, H, Ld, D)
    out = _take(torch.cat([out_s, out_d], dim=2), plan.back)  # [B, H, N, D], input order
    return out.transpose(1, 2).contiguous(), None


def register_split() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SPLIT_IMPL, split_attention_forward)
