"""The `<bkspc>` visibility mask, as a dense 4-D SDPA mask and as a FlexAttention BlockMask (DESIGN §2).

Key k is visible to query q iff  k <= q  and  q < deleted_at[k].  The data is O(L) per row
(`deleted_at`), so the FlexAttention `mask_mod` is block-sparse and the dense form is only the
portable fallback. Rows without backspaces have deleted_at = +inf everywhere: the plain causal mask.
A packed row (several traces, `seg_start` [B, N] = the first input of each input's segment) adds
seg_start[q] <= k: a query sees only its own segment.
"""

from __future__ import annotations

import torch


def dense_mask(deleted_at: torch.Tensor, seg_start: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] deleted_at (and seg_start) -> [B, 1, N, N] bool mask for SDPA (True = attend)."""
    N = deleted_at.shape[1]
    idx = torch.arange(N, device=deleted_at.device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    alive = idx[None, :, None] < deleted_at[:, None, :]  # [B, q, k]: q < deleted_at[k]
    mask = causal[None] & alive
    if seg_start is not None:
        mask &= idx[None, None, :] >= seg_start[:, :, None]  # k >= seg_start[q]
    return mask[:, None]


def segment_end(seg_start: torch.Tensor) -> torch.Tensor:
    """[B, N] seg_start -> [B, N] the end (exclusive) of each input's segment. For k <= q, q lies in
    k's segment iff q < segment_end[k], so packing folds into deleted_at and the FlexAttention
    mask_mod stays the unpacked one (it reads no q-indexed data, which the CPU inductor template
    miscompiles: `cur_kvSplitSize8 was not declared`, torch 2.13)."""
    B, N = seg_start.shape
    idx = torch.arange(N, device=seg_start.device).expand(B, N)
    starts = torch.where(seg_start == idx, idx, torch.full_like(idx, N))  # the inputs that open a segment
    nxt = torch.cat([starts[:, 1:], torch.full_like(starts[:, :1], N)], dim=1)  # opens at k+1, k+2 ...
    return nxt.flip(1).cummin(1).values.flip(1)  # the first segment start after k


def flex_block_mask(deleted_at: torch.Tensor, block_size: int = 128, seg_start: torch.Tensor | None = None):
    """[B, N] deleted_at (and seg_start) -> FlexAttention BlockMask (shared across heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, N = deleted_at.shape

    if seg_start is not None:  # for k <= q, "k >= seg_start[q]" is "q < the end of k's segment"
        deleted_at = torch.minimum(deleted_at, segment_end(seg_start))

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < deleted_at[b, kv_idx])

    mask = create_block_mask(
        mask_mod, B=B, H=None, Q_LEN=N, KV_LEN=N, device=deleted_at.device, BLOCK_SIZE=block_size
    )
    mask.__class__ = _BlockMask4D
    return mask


def _block_mask_4d_class():
    from torch.nn.attention.flex_attention import BlockMask

    class BlockMask4D(BlockMask):
        """A BlockMask that answers `.ndim == 4`: GPT-2's forward checks `attention_mask.ndim`
        before handing a 4-D mask through; a BlockMask is 4-D ([B, H, Q, KV]) but has no `ndim`."""

        ndim = 4

    return BlockMask4D


_BlockMask4D = _block_mask_4d_class()
