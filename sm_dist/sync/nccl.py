"""NCCL weight sync for GPU clusters (DESIGN §4), over vLLM's native weight-transfer API.

Written against the vLLM 0.32.0 sources installed here (`vllm/distributed/weight_transfer/
nccl_engine.py`: `NCCLTrainerWeightTransferEngine`, `NCCLTrainerInitInfo`; `base.py`: `WeightSource`,
`ParamMeta`, the `VLLMWeightSyncClient` protocol; `entrypoints/rl/offline.py`: `LLM.
init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update`; engine
arg `weight_transfer_config=WeightTransferConfig(backend="nccl")`). It has NOT been run: the CPU
machines have no CUDA and the lent GPU machine has no vLLM/Ray. pyproject pins the GPU extra to the
same vLLM release (`vllm==0.32.0`) so that these names hold; re-read them before moving the pin.

The driver wires it exactly like the gloo transport (`sm_dist.sync.collective`), which shares the
worker protocol and runs in CI: `sync.transport=nccl` builds threaded workers with
`weight_transfer_backend="nccl"`, learner rank 0 `connect_weight_transfer("nccl", ...)`s once, and every
`sync.every` steps `publish_weights(version)` runs start -> update -> finish.

Ordering (learner rank 0, one process that holds the full weights on a GPU):

    transport = NcclTransport(workers, master_address, master_port, num_vllm_workers=len(workers))
    transport.connect(model)              # rendezvous: trainer is NCCL rank 0, vLLM workers 1..N
    ...
    transport.publish(version, model.state_dict())   # start -> update (+ broadcast) -> finish

The workers are `RolloutWorker` actors built with `engine_kwargs={"weight_transfer_backend": "nccl"}`
and `max_concurrency >= 2`; `RolloutWorker.weight_transfer` holds the engine lock from "start" to
"finish", so the broadcast lands between two batches, never inside one. After a timeout the NCCL
group is unusable (a blocked collective cannot be cancelled): tear the workers down.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from sm_dist.sync.base import WeightSyncError, WeightTransport
from sm_dist.sync.collective import StageClient


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "NcclTransport needs CUDA (NCCL broadcast from a GPU learner to CUDA vLLM workers); this "
            "process has no GPU. Use sync.transport=object_store on CPU machines."
        )


class _WorkerClient(StageClient):
    """`VLLMWeightSyncClient` (vLLM's structural protocol) over RolloutWorker actor handles."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.call("init", init_info)

    def start_weight_update(self) -> None:
        self.call("start")

    def update_weights(self, update_info) -> None:
        self.call("update", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.call("finish")


def _make_source(module: torch.nn.Module):
    """A vLLM `WeightSource` over `module.state_dict()` (fresh pass each round; tied copies sent once)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    def pairs() -> Iterator[tuple[str, torch.Tensor]]:
        seen: set[int] = set()
        for name, t in module.state_dict().items():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            yield name, t.detach()

    class ModuleSource(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name=n, dtype=t.dtype, shape=tuple(t.shape)) for n, t in pairs()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return pairs()

    return ModuleSource()


class NcclTransport(WeightTransport):
    """Learner-side NCCL publisher (rank 0 sends; workers receive inside vLLM)."""

    def __init__(
        self,
        workers: Sequence[Any],
        master_address: str,
        master_port: int,
        num_vllm_workers: int,
        timeout_s: float = 300.0,
        packed: bool = True,
        worker_names: Sequence[str] = (),
    ):
        _require_cuda()
        self.client = _WorkerClient(workers, worker_names, timeout_s, "NCCL")
        self.master_address, self.master_port = master_address, master_port
        self.world_size = 1 + num_vllm_workers  # trainer rank 0 + every vLLM worker process
        self.timeout_s, self.packed = timeout_s, packed
        self._engine = None
        self._module: torch.nn.Module | None = None

    def connect(self, module: torch.nn.Module) -> None:
        """Rendezvous with every vLLM worker; `module` is the model whose weights `publish` sends."""
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        info = NCCLTrainerInitInfo(
            master_address=self.master_address,
            master_port=self.master_port,
            world_size=self.world_size,
            packed=self.packed,
            rank=0,
        )
        self._module = module
        self._engine = self._with_timeout(
            "init",
            lambda: NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=self.client, source=_make_source(module)
            ),
        )

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Broadcast the connected module's current weights as `version`. `state_dict` must be that
        module's (the source re-reads the module, which avoids a second copy on the GPU)."""
        import time

        if self._engine is None or self._module is None:
            raise RuntimeError("NcclTransport.publish before connect(module)")
        first = next(iter(state_dict.values()))
        if not any(first.data_ptr() == p.data_ptr() for p in self._module.state_dict().values()):
            raise ValueError("NcclTransport.publish: state_dict is not the connected module's")
        self.client.version = version
        t0 = time.perf_counter()
        self._with_timeout("send", self._engine.send_weights)
        return {"sync/version": float(version), "sync/total_s": time.perf_counter() - t0}

    def receive(self, engine: Any, payload: Any, version: int, worker_id: str) -> int:
        raise NotImplementedError(
            f"{worker_id}: NCCL weights are received inside vLLM (RolloutWorker.weight_transfer), "
            "not through WeightTransport.receive"
        )

    def _with_timeout(self, what: str, fn):
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            return exe.submit(fn).result(timeout=self.timeout_s)
        except FutureTimeout as e:
            raise WeightSyncError(
                f"NCCL weight transfer {what!r} (version {self.client.version}) did not finish within "
                f"{self.timeout_s}s; the NCCL group is now unusable, restart the rollout workers"
            ) from e
        finally:
            exe.shutdown(wait=False)
