"""Weight sync through the Ray object store (DESIGN §4, default transport; CPU and GPU, cross-node).

Rank 0 (`ObjectStoreSender`) serialises the state dict to safetensors bytes once and `ray.put`s them
once; each worker's `receive_weights("update", [ref], version)` (`ObjectStoreReceiver`) gets the
reference, `ray.get`s the bytes (shared memory on the same node) and loads them into vLLM through the
worker extension (`sm_dist.sync.vllm_ext`). Every wait has a timeout.
"""

from __future__ import annotations

import json
import struct
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sm_dist.sync.base import Delivery, WeightReceiver, WeightSender, WeightSyncError
from sm_dist.sync.stream import WeightStream, as_stream, wire_order

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


def state_dict_to_buffer(
    weights: Mapping[str, torch.Tensor] | WeightStream, dtype: torch.dtype | None = None
) -> np.ndarray:
    """The weights in safetensors' file layout (8-byte header length, JSON header, raw data), written
    with one copy into a uint8 numpy array; floating-point tensors in `dtype` (None: as they are),
    converted by that same copy (no second copy of the model in either dtype).

    `weights` is a state dict or a `WeightStream` (sm_dist.sync.stream): the header is built from the
    specs alone, then each tensor is read (under FSDP2: all-gathered) and copied in, one at a time, in
    `wire_order` (largest element size first, so every tensor's offset is aligned to its element size).
    A tensor sharing storage with an earlier one (tied embeddings) is sent once, under its first name.

    Why numpy and not bytes: Ray stores a numpy array out of band, so a reader on the same node maps it
    from the object store without a copy (bytes are copied on every `ray.get`); and the layout is still
    a valid safetensors file (`safetensors.torch.load(bytes(buf))` reads it).
    """
    stream = as_stream(weights, dtype)
    header, off = {}, 0
    for s in wire_order(stream.specs):
        header[s.name] = {
            "dtype": _ST_DTYPES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [off, off + s.nbytes],
        }
        off += s.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # keep the data section 8-byte aligned
    buf = np.empty(8 + len(hb) + off, dtype=np.uint8)
    buf[:8] = np.frombuffer(struct.pack("<Q", len(hb)), dtype=np.uint8)
    buf[8 : 8 + len(hb)] = np.frombuffer(hb, dtype=np.uint8)
    data = torch.from_numpy(buf[8 + len(hb) :])
    for name, t in stream.items():
        h = header[name]
        a, b = h["data_offsets"]
        dst = data[a:b].view(_ST_TORCH[h["dtype"]]).view(h["shape"])
        dst.copy_(t)  # device -> host and, where dtype differs, the cast, in one copy
    return buf


def safetensors_views(buf: Any) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors buffer (bytes, memoryview or uint8 array) as views, without copying.

    The views share the (possibly read-only) buffer: read them, never write them. Misaligned data
    (another writer's file) falls back to a copy.
    """
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1)
    n = int.from_bytes(arr[:8].tobytes(), "little")
    header = json.loads(arr[8 : 8 + n].tobytes())
    header.pop("__metadata__", None)
    with warnings.catch_warnings():  # a read-only buffer: torch warns that writes would be undefined
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(arr[8 + n :]) if arr.size > 8 + n else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        dtype, part = _ST_TORCH[h["dtype"]], raw[a:b]
        if part.data_ptr() % torch.empty(0, dtype=dtype).element_size():
            part = part.clone()
        out[name] = part.view(dtype).reshape(h["shape"])
    return out


class ObjectStoreSender(WeightSender):
    """Learner rank 0: serialise once, `ray.put` once, and queue the reference on every worker; the
    send returns at once and `Delivery.pending` holds each worker's confirmation. The last version's
    reference is kept (this process owns it), so a restarted worker gets it again (`resend`)."""

    def __init__(self, timeout_s: float):
        super().__init__(timeout_s)
        self._last: tuple[int, Any] | None = None

    def send(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> Delivery:
        import ray

        t0 = time.perf_counter()
        stream = as_stream(state_dict, self.dtype)
        blob = state_dict_to_buffer(stream)
        t1 = time.perf_counter()
        self._last = (version, ray.put(blob))
        t2 = time.perf_counter()
        pending = {i: self._queue(i) for i in range(len(self.workers))}
        return Delivery(
            version,
            pending,
            {"sync/version": float(version), "sync/bytes": float(blob.nbytes), "sync/serialize_s": t1 - t0,
             "sync/put_s": t2 - t1, "sync/largest_read_bytes": float(stream.largest_read_bytes)},
        )  # fmt: skip

    def resend(self, index: int) -> Delivery:
        if self._last is None:
            return Delivery(0)  # nothing published yet: the worker's initial weights are current
        return Delivery(self._last[0], {index: self._queue(index)})

    def _queue(self, index: int) -> Any:
        """The reference travels wrapped in a list, so Ray does not resolve it before the call: the
        worker's own `ray.get` carries the timeout, and its error names the worker."""
        version, ref = self._last
        return self.workers[index].receive_weights.remote("update", [ref], version)


class ObjectStoreReceiver(WeightReceiver):
    """A worker: fetch the buffer (zero-copy on the same node) and load it into vLLM."""

    def update(self, info: Any, version: int | None) -> None:
        blob = fetch_blob(info, version, self.worker_id, self.timeout_s)
        self.engine.load_weights_bytes(blob, version)


def fetch_blob(payload: Any, version: int, worker_id: str, timeout_s: float) -> Any:
    """Resolve what `publish` sent into a safetensors buffer, with a timeout that names the worker
    and version."""
    import ray

    if isinstance(payload, (list, tuple)):
        if len(payload) != 1:
            raise ValueError(
                f"{worker_id}: expected [ObjectRef] for version {version}, got {len(payload)} items"
            )
        payload = payload[0]
    if isinstance(payload, ray.ObjectRef):
        try:
            payload = ray.get(payload, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise WeightSyncError(
                f"{worker_id}: fetching the weights of version {version} from the object store took "
                f"longer than {timeout_s}s"
            ) from e
    if not isinstance(payload, (bytes, bytearray, memoryview, np.ndarray)):
        raise TypeError(
            f"{worker_id}: weights of version {version} must be a safetensors buffer, got {type(payload)}"
        )
    return payload  # no copy: a numpy array from the object store is a view of shared memory
