"""Weight sync through the Ray object store (DESIGN §4, default transport; CPU and GPU, cross-node).

Rank 0 serialises the state dict to safetensors bytes once and `ray.put`s them once; each worker's
`update_weights` gets the reference, `ray.get`s the bytes (shared memory on the same node) and loads
them into vLLM through the worker extension (`sm_dist.sync.vllm_ext`). Every wait has a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sm_dist.sync.base import WeightSyncError, WeightTransport, confirm_version, wait_all


def state_dict_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of `state_dict` on the CPU; a tensor sharing storage with an earlier one
    (tied embeddings) is sent once, under its first name (vLLM skips the tied copy anyway)."""
    from safetensors.torch import save

    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return save(out)


class ObjectStoreTransport(WeightTransport):
    """Learner-side publisher to a list of `RolloutWorker` actor handles (and the worker-side loader)."""

    def __init__(
        self, workers: Sequence[Any] = (), timeout_s: float = 120.0, worker_names: Sequence[str] = ()
    ):
        self.workers = list(workers)
        self.worker_names = list(worker_names) or [f"worker[{i}]" for i in range(len(self.workers))]
        self.timeout_s = timeout_s

    def send(self, version: int, ref: Any) -> list:
        """Queue `version` (an ObjectRef to safetensors bytes) on every worker, after its current
        batch; return one future per worker (answering the version it loaded) without waiting.

        The ref is wrapped in a list so Ray does not resolve it before the call: the worker's own
        ray.get then carries the timeout and the error names the worker."""
        return [w.update_weights.remote([ref], version) for w in self.workers]

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        blob = state_dict_to_bytes(state_dict)
        t1 = time.perf_counter()
        ref = ray.put(blob)
        t2 = time.perf_counter()
        got = wait_all(
            self.send(version, ref), self.worker_names, self.timeout_s, f"weight sync of version {version}"
        )
        for name, v in zip(self.worker_names, got, strict=True):
            confirm_version(name, v, version)
        t3 = time.perf_counter()
        return {
            "sync/version": float(version),
            "sync/bytes": float(len(blob)),
            "sync/serialize_s": t1 - t0,
            "sync/put_s": t2 - t1,
            "sync/apply_s": t3 - t2,
            "sync/total_s": t3 - t0,
        }

    def receive(self, engine: Any, payload: Any, version: int, worker_id: str) -> int:
        """`payload`: bytes, an ObjectRef, or a one-element list holding an ObjectRef."""
        blob = fetch_blob(payload, version, worker_id, self.timeout_s)
        return engine.load_weights_bytes(blob, version)


def fetch_blob(payload: Any, version: int, worker_id: str, timeout_s: float) -> bytes:
    """Resolve what `publish` sent into bytes, with a timeout that names the worker and version."""
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
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"{worker_id}: weights of version {version} must be safetensors bytes, got {type(payload)}"
        )
    return bytes(payload)
