"""One config class per weight transport, selected by `sync.transport.kind` (a discriminated union).

Pure pydantic (no torch, Ray or vLLM), so `sm_dist.config` validates a run before anything starts
(`SyncConfig.transport` in sm_dist/config/run.py; a bare name there means `{kind: name}`).
Each class says what the rest of the system needs to know about its transport, and builds the two
ends of it lazily (the imports happen in the process that uses them):

    ends                      (module, sender class, receiver class): the transport's code in sm_dist/sync
    sender(timeout_s)         learner rank 0's end (`WeightSender`, given the class's other fields),
                              built inside the learner actor
    receiver(engine, ...)     a rollout worker's end (`WeightReceiver`), built inside the worker actor
    engine_kwargs()           extra `vllm.LLM` arguments the receiving engine needs (in the worker)
    collective                the workers must be threaded (a stage runs beside the batch it waits for)
    survives_restarts         a restarted worker or learner can rejoin (else the run stops, resumable)
    check(cfg)                cross-section checks on the whole config (an error names the fix)

Adding a transport: one module in `sm_dist/sync/` with its sender and receiver, one class here, and
its name in `TransportConfig` (tests/unit/test_config_registries.py checks every class names real
sender and receiver classes). In YAML either `transport: gloo` or `transport: {kind: gloo, ...}`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Transport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    collective: ClassVar[bool] = False
    survives_restarts: ClassVar[bool] = False
    ends: ClassVar[tuple[str, str, str]]  # (module, sender class, receiver class) in sm_dist/sync

    def _end(self, i: int):
        import importlib

        return getattr(importlib.import_module(self.ends[0]), self.ends[i])

    def sender(self, timeout_s: float):
        """Learner rank 0's end (a `WeightSender`), built in the learner process."""
        return self._end(1)(timeout_s, **self.model_dump(exclude={"kind"}))

    def receiver(self, engine: Any, worker_id: str, timeout_s: float):
        """A rollout worker's end (a `WeightReceiver`), built in the worker process."""
        return self._end(2)(engine, worker_id, timeout_s)

    def engine_kwargs(self) -> dict[str, Any]:
        return {}

    def check(self, cfg: Any) -> None:
        """Raise ValueError (naming the key and the fix) when the rest of `cfg` cannot use this transport."""


class ObjectStoreConfig(_Transport):
    """Ray's object store (the default; CPU and GPU, any cluster): rank 0 puts one safetensors buffer,
    each worker fetches it between two batches. Restarted workers and learners rejoin."""

    kind: Literal["object_store"] = Field("object_store", description="The transport.")
    survives_restarts: ClassVar[bool] = True

    ends: ClassVar[tuple[str, str, str]] = (
        "sm_dist.sync.object_store",
        "ObjectStoreSender",
        "ObjectStoreReceiver",
    )


class GlooConfig(_Transport):
    """A collective broadcast from learner rank 0 over a private gloo group (CPU): the collective
    path of NCCL, runnable on any machine."""

    kind: Literal["gloo"] = Field("gloo", description="The transport.")
    collective: ClassVar[bool] = True

    ends: ClassVar[tuple[str, str, str]] = ("sm_dist.sync.collective", "GlooSender", "GlooReceiver")


class NcclConfig(_Transport):
    """vLLM's NCCL weight-transfer engine: GPU learner rank 0 broadcasts into GPU vLLM workers."""

    kind: Literal["nccl"] = Field("nccl", description="The transport.")
    packed: bool = Field(True, description="Pack tensors into few NCCL broadcasts (vLLM's packed mode).")
    collective: ClassVar[bool] = True

    ends: ClassVar[tuple[str, str, str]] = ("sm_dist.sync.nccl", "NcclSender", "NcclReceiver")

    def engine_kwargs(self) -> dict[str, Any]:
        from sm_dist.sync.nccl import engine_kwargs

        return engine_kwargs()

    def check(self, cfg: Any) -> None:
        if cfg.learner.gpus_per_learner < 1 or cfg.rollout.gpus_per_worker < 1:
            raise ValueError(
                "sync.transport: nccl broadcasts from a GPU learner into GPU vLLM workers, but "
                f"learner.gpus_per_learner={cfg.learner.gpus_per_learner} and rollout.gpus_per_worker="
                f"{cfg.rollout.gpus_per_worker}. Fix: give both a GPU, or use sync.transport.kind=object_store "
                "(or gloo on CPU)"
            )
        if cfg.learner.strategy != "ddp":
            raise ValueError(
                "sync.transport: nccl sends rank 0's full weights, which learner.strategy=fsdp2 shards. "
                "Fix: use sync.transport.kind=object_store with fsdp2, or learner.strategy=ddp"
            )


TransportConfig = Annotated[ObjectStoreConfig | GlooConfig | NcclConfig, Field(discriminator="kind")]
