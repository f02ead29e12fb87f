"""The `<bkspc>` visibility mask, as a dense 4-D SDPA mask and as a FlexAttention BlockMask (DESIGN §2).

Key k is visible to query q iff  k <= q  and  q < deleted_at[k].  The data is O(L) per row
(`deleted_at`), so the FlexAttention `mask_mod` is block-sparse and the dense form is only the
portable fallback. Rows without backspaces have deleted_at = +inf everywhere: the plain causal mask.
"""

from __future__ import annotations

import torch


def dense_mask(deleted_at: torch.Tensor) -> torch.Tensor:
    """[B, N] deleted_at -> [B, 1, N, N] bool mask for SDPA (True = attend)."""
    N = deleted_at.shape[1]
    idx = torch.arange(N, device=deleted_at.device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    alive = idx[None, :, None] < deleted_at[:, None, :]  # [B, q, k]: q < deleted_at[k]
    return (causal[None] & alive)[:, None]


def flex_block_mask(deleted_at: torch.Tensor, block_size: int = 128):
    """[B, N] deleted_at -> FlexAttention BlockMask (shared across heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, N = deleted_at.shape

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
