"""NCCL weight sync for GPU clusters (DESIGN §4), over vLLM's native weight-transfer API.

Written against the vLLM 0.32.0 sources installed here (`vllm/distributed/weight_transfer/
nccl_engine.py`: `NCCLTrainerWeightTransferEngine`, `NCCLTrainerInitInfo`; `base.py`: `WeightSource`,
`ParamMeta`, the `VLLMWeightSyncClient` protocol; `entrypoints/rl/offline.py`: `LLM.
init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update`; engine
arg `weight_transfer_config=WeightTransferConfig(backend="nccl")`). It has NOT been run: the CPU
machines have no CUDA and the lent GPU machine has no vLLM/Ray. pyproject pins the GPU extra to the
same vLLM release (`vllm==0.32.0`) so that these names hold; re-read them before moving the pin.

It shares the worker protocol with the gloo transport (`sm_dist.sync.collective`), which runs in CI:
`sync.transport.kind=nccl` builds threaded workers whose engines get `engine_kwargs()`, learner rank 0's
`NcclSender.connect` rendezvouses once at its own address, and every `sync.every` steps `send` runs
start -> update (+ broadcast) -> finish; each worker's `NcclReceiver` forwards the stages to vLLM.

    sender = NcclSender(timeout_s=300, packed=True)
    sender.connect(workers, names, model)        # trainer is NCCL rank 0, vLLM workers 1..N
    sender.send(version, model.state_dict())     # start -> update (+ broadcast) -> finish

`RolloutWorker.receive_weights` holds the engine lock from "start" to "finish", so the broadcast lands
between two batches, never inside one. After a timeout the NCCL group is unusable (a blocked
collective cannot be cancelled): tear the workers down.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from sm_dist.sync.base import Delivery, WeightReceiver, WeightSender, WeightSyncError
from sm_dist.sync.collective import StageClient


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "sync.transport.kind=nccl needs CUDA (NCCL broadcast from a GPU learner to CUDA vLLM workers); this "
            "process has no GPU. Use sync.transport.kind=object_store on CPU machines."
        )


def engine_kwargs() -> dict[str, Any]:
    """The `vllm.LLM` argument that gives a worker's engine vLLM's NCCL weight-transfer engine."""
    from vllm.config import WeightTransferConfig

    return {"weight_transfer_config": WeightTransferConfig(backend="nccl")}


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


class NcclReceiver(WeightReceiver):
    """Worker side: each stage goes to the engine's vLLM weight-transfer API."""

    def init(self, info: Any, version: int | None) -> None:
        self.engine.llm.init_weight_transfer_engine({"init_info": info})

    def start(self, info: Any, version: int | None) -> None:
        self.engine.llm.start_weight_update()

    def update(self, info: Any, version: int | None) -> None:
        self.engine.llm.update_weights({"update_info": info})

    def finish(self, info: Any, version: int | None) -> None:
        self.engine.llm.finish_weight_update()
        self.engine.weights_changed(version)  # drops the prefix cache, tags the new version


class NcclSender(WeightSender):
    """Learner rank 0 (one process that holds the full weights on a GPU) sends; workers receive
    inside vLLM. `num_vllm_workers_per_engine` > 1 for tensor-parallel engines."""

    def __init__(self, timeout_s: float, packed: bool, num_vllm_workers_per_engine: int = 1):
        super().__init__(timeout_s)
        self.packed, self.per_engine = packed, num_vllm_workers_per_engine
        self._engine = None
        self._module: torch.nn.Module | None = None

    def connect(self, workers: Sequence[Any], names: Sequence[str], module: Any = None, dtype=None) -> None:
        """Rendezvous at this node's address with every vLLM worker; `module` is the model `send` sends."""
        import ray
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        from sm_dist.orchestrator.cluster import free_port

        _require_cuda()
        super().connect(workers, names, module, dtype)
        self.client = _WorkerClient(self.workers, self.names, self.timeout_s, "NCCL")
        addr = ray.util.get_node_ip_address()
        info = NCCLTrainerInitInfo(
            master_address=addr,
            master_port=free_port(addr),
            world_size=1 + len(self.workers) * self.per_engine,  # trainer rank 0 + every vLLM worker process
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

    def send(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> Delivery:
        """Broadcast the connected module's current weights as `version`. `state_dict` must be that
        module's (the source re-reads the module, which avoids a second copy on the GPU)."""
        import time

        if self._engine is None or self._module is None:
            raise RuntimeError("NcclSender.send before connect(workers, names, module)")
        first = next(iter(state_dict.values()))
        if not any(first.data_ptr() == p.data_ptr() for p in self._module.state_dict().values()):
            raise ValueError("NcclSender.send: state_dict is not the connected module's")
        self.client.version = version
        t0 = time.perf_counter()
        self._with_timeout("send", self._engine.send_weights)
        return Delivery(
            version, metrics={"sync/version": float(version), "sync/apply_s": time.perf_counter() - t0}
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
