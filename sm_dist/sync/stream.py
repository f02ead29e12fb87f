"""Weights as a stream: every tensor's name, shape and dtype known up front, each tensor made only when it
is read, so a sender never holds more than one full tensor beyond its own wire buffer.

    stream = from_state_dict(module.state_dict(), torch.bfloat16)  # FSDP2: DTensor shards, nothing gathered
    buf = state_dict_to_buffer(stream)   # rank 0 (sm_dist.sync.object_store): header, then one read per tensor
    drain(stream)                        # every other rank: the same reads, in the same order

Under FSDP2 a read all-gathers that one parameter (`full_tensor`), a collective, so every rank reads the
same tensors in the same order: the wire order (`wire_order`), which depends on the specs alone. Why
this and not `get_model_state_dict(full_state_dict=True)`: that gathers the whole model onto rank 0
(32 GB in float32 for an 8B model) before the first byte is sent; here rank 0 holds the wire buffer (in
the engines' dtype) and one gathered tensor at a time. LoRA's merged weights are a stream too
(`sm_dist.learner.lora.merged_stream`): a read gathers one layer's base weight and its two adapter
matrices and merges them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Spec:
    """One tensor of a stream: its name, its full shape and the dtype it travels in."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


class WeightStream:
    """Named tensors made on demand: `specs` up front, `read(name)` makes one (a collective under
    FSDP2). `largest_read_bytes` is the most any one read made (what a sender held beside its buffer)."""

    def __init__(self, specs: list[Spec], make: Callable[[str], torch.Tensor]):
        self.specs = specs
        self._make = make
        self.largest_read_bytes = 0

    def read(self, name: str) -> torch.Tensor:
        t = self._make(name)
        self.largest_read_bytes = max(self.largest_read_bytes, t.numel() * t.element_size())
        return t

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for s in wire_order(self.specs):
            yield s.name, self.read(s.name)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def wire_order(specs: list[Spec]) -> list[Spec]:
    """The order tensors are read and laid out in: largest element size first (so every tensor's offset in
    a safetensors buffer is aligned to its element size), the given order within one size. Depends on the
    specs alone, so every rank computes the same order without communicating."""
    return sorted(specs, key=lambda s: -s.dtype.itemsize)


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a DTensor (an FSDP2 shard) all-gathered from every rank (a collective: every rank calls
    it for the same tensor, in the same order), moved to its mesh's device first where it was offloaded
    (as torch.distributed's own `_gather_state_dict` does); a plain tensor as it is."""
    if not is_dtensor(t):
        return t.detach()
    from torch.distributed.tensor import Replicate

    t = t.detach()
    if t.device.type != t.device_mesh.device_type:
        t = t.to(t.device_mesh.device_type)
    out = t.redistribute(device_mesh=t.device_mesh, placements=[Replicate()] * len(t.placements)).to_local()
    return out.wait() if hasattr(out, "wait") else out


def first_names(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of `sd` without the later names of a tensor it holds twice (a head tied to its embedding):
    same storage, offset and shape (an FSDP2 shard's local tensor); an empty tensor is never an alias.
    Depends on how the model ties its tensors alone, so every rank keeps the same names."""
    seen: set[tuple] = set()
    out = []
    for name, t in sd.items():
        local = t.to_local() if is_dtensor(t) else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape))
        if key not in seen or local.numel() == 0:
            seen.add(key)
            out.append(name)
    return out


def out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """What `t` travels in: `dtype` for floating-point tensors (None: as it is), integers as they are."""
    return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype


def from_state_dict(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> WeightStream:
    """A stream over `sd` (live tensors, or FSDP2's DTensor shards: gathered one at a time when read),
    floating-point tensors in `dtype`. A tensor sharing storage with an earlier one (a head tied to its
    embedding) is left out: it travels once, under its first name."""
    specs = [Spec(n, tuple(sd[n].shape), out_dtype(sd[n], dtype)) for n in first_names(sd)]
    return WeightStream(specs, lambda name: full_tensor(sd[name]))


def as_stream(weights: Mapping[str, torch.Tensor] | WeightStream, dtype: torch.dtype | None) -> WeightStream:
    """`weights` as a stream (a state dict is wrapped by `from_state_dict`)."""
    return weights if isinstance(weights, WeightStream) else from_state_dict(weights, dtype)


def drain(stream: WeightStream) -> None:
    """Read every tensor of `stream` in wire order and drop it: what a rank other than the sender does
    while rank 0 sends, so that each FSDP2 all-gather has every rank in it."""
    for _ in stream.items():
        pass
