"""The object-store weight buffer: safetensors layout written once, read back as zero-copy views."""

import numpy as np
import torch
from safetensors.torch import load, save

from sm_dist.sync.object_store import safetensors_views, state_dict_to_buffer


def _state_dict():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 3, generator=g)
    return {
        "a.bf16": torch.randn(5, generator=g).to(torch.bfloat16),  # odd byte count before wider dtypes
        "b.f32": torch.randn(3, 4, generator=g),
        "c.i64": torch.arange(6).reshape(2, 3),
        "d.bool": torch.tensor([True, False, True]),
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied: same storage, sent once
        "e.f16": torch.randn(2, 2, generator=g).half(),
        "f.scalar": torch.tensor(2.5),
    }


def test_buffer_is_a_safetensors_file_and_round_trips():
    sd = _state_dict()
    buf = state_dict_to_buffer(sd)
    assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8
    via_lib = load(bytes(buf))  # the reference reader accepts it
    views = safetensors_views(buf)
    assert set(views) == set(via_lib) == set(sd) - {"lm_head.weight"}
    for name, t in views.items():
        assert t.dtype == sd[name].dtype and torch.equal(t, sd[name]) and torch.equal(via_lib[name], sd[name])


def test_views_share_the_buffer_and_read_reference_files():
    buf = state_dict_to_buffer(_state_dict())
    lo, hi = buf.ctypes.data, buf.ctypes.data + buf.nbytes
    for t in safetensors_views(buf).values():
        assert lo <= t.data_ptr() < hi or t.numel() == 0  # no copy
    ref = {"x": torch.randn(3, 5), "y": torch.arange(4, dtype=torch.int32)}
    got = safetensors_views(save(ref))  # bytes written by the safetensors library itself
    assert all(torch.equal(got[k], ref[k]) for k in ref)
