"""The rollout worker (DESIGN §2, §4): prompts in, backspace-aware rollouts out, weights applied between
batches. A plain class; the driver applies `ray.remote`:

    Worker = ray.remote(num_cpus=1, max_concurrency=2)(RolloutWorker)
    w = Worker.remote("w0", model_dir, prompt_shard, RolloutParams(...), batch_size=32, sink=buffer,
                      engine=EngineConfig(...), transport=cfg.sync.transport)
    stats = ray.get(w.run_batch.remote())            # one batch of rows into the sink; `rollout/...` stats
    sender.connect([w], ["w0"]); sender.send(v, sd)  # learner rank 0 -> w.receive_weights(...)

Public methods: `run_batch`, `receive_weights`, `version`, `set_prompts` (a new shard after scaling) and
`generate` (rollouts sent nowhere: held-out evaluation). `incarnation` and `probe_logprobs` run in a
worker's process through Ray's `w.__ray_call__.remote(fn, *args)`, which passes the worker first.

Weights arrive through one entry point, `receive_weights(stage, info, version)`, which hands each stage
to the transport's receiver (`sync.transport.receiver(...)`, sm_dist/sync). They are never applied
mid-generation: `run_batch` and the weight load both hold `self._engine_lock`, so an update requested
during a batch (threaded actor, `max_concurrency >= 2`) waits for that batch to end. With a
single-threaded actor (`max_concurrency=1`, the default) the same holds trivially: calls run in turn.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm_dist.rollout.engine import BackspaceEngine, Rollout, RolloutParams


@dataclass(frozen=True)
class PromptShard:
    """A worker's prompts by reference (an ObjectRef the driver holds for the whole run).

    Passed to the constructor instead of the prompts themselves, it keeps the actor's creation
    arguments a few bytes long, so they are inlined in its creation task and Ray can re-run the
    constructor on a restart (`rollout.max_restarts`): creation arguments that Ray moved to the object
    store may be gone by then (ray-project/ray#53727)."""

    ref: Any
    targets_ref: Any = None  # the prompts' expert targets (answer + eos), for correction rows

    def load(self) -> list:
        import ray

        return ray.get(self.ref)

    def load_targets(self) -> list | None:
        import ray

        return None if self.targets_ref is None else ray.get(self.targets_ref)


def _checked(
    worker_id: str, prompts: Sequence, targets: Sequence | None, corrections: bool
) -> list[list[int]]:
    """A prompt shard as lists of ints, refused when empty or (`corrections`: correction rows are on)
    without one expert target per prompt."""
    if not prompts:
        raise ValueError(f"{worker_id}: need a non-empty prompt shard (got 0 prompts)")
    if corrections and (targets is None or len(targets) != len(prompts)):
        raise ValueError(
            f"{worker_id}: correction rows (data_sink) need one expert target per prompt; got "
            f"{None if targets is None else len(targets)} for {len(prompts)} prompts"
        )
    return [list(map(int, p)) for p in prompts]


def to_rows(rollouts: list[Rollout], version: int, worker_id: str) -> list[dict]:
    """Rows of the buffer's Arrow schema (sm_dist.buffer.schema), one per rollout of `worker_id`."""
    now = dt.datetime.now(dt.UTC)
    return [
        {
            "sample_id": f"{worker_id}-{uuid.uuid4().hex}",
            "prompt_ids": r.prompt_ids,
            "action_ids": r.action_ids,
            "final_ids": r.final_ids,
            "source": "model",
            "policy_version": int(version),
            "logprobs": r.logprobs,
            "finish_reason": r.finish_reason,
            "worker_id": worker_id,
            "created_at": now,
        }
        for r in rollouts
    ]


class RolloutWorker:
    """Samples rollouts for its prompt shard and sends them, as Arrow batches, to `sink`."""

    def __init__(
        self,
        worker_id: str,
        model_dir: str | Path,
        prompts: Sequence[Sequence[int]] | PromptShard,
        params: RolloutParams,
        batch_size: int,
        sink: Any = None,
        engine: Any = None,
        transport: Any = None,
        seed: int = 0,
        dtype: str = "float32",
        sink_timeout_s: float = 120.0,
        sync_timeout_s: float = 300.0,
        data_sink: Any = None,
        targets: Sequence[Sequence[int]] | None = None,
        worker_extension_cls: str | None = "sm_dist.sync.vllm_ext.WeightSyncExtension",
    ):
        """`engine`: the `rollout.engine` config (`EngineConfig`, None: its defaults); `transport`: the
        `sync.transport` config (None: the object store); `seed`, `dtype`: the engine's."""
        from sm_dist.config import EngineConfig
        from sm_dist.sync.config import ObjectStoreConfig

        if isinstance(prompts, PromptShard):
            targets = prompts.load_targets() if targets is None else targets
            prompts = prompts.load()
        if batch_size < 1:
            raise ValueError(f"{worker_id}: need batch_size >= 1 (got {batch_size})")
        self.worker_id = worker_id
        self.prompts = _checked(worker_id, prompts, targets, data_sink is not None)
        self.params = params
        self.batch_size = batch_size
        self.sink = sink
        self.data_sink, self.targets = data_sink, targets  # correction rows (rollout.correction_rows)
        self.sink_timeout_s = sink_timeout_s
        e, transport = engine or EngineConfig(), transport or ObjectStoreConfig()
        self.engine = BackspaceEngine(
            model_dir, seed=seed, dtype=dtype, max_model_len=e.max_model_len,
            gpu_memory_utilization=e.gpu_memory_utilization, enforce_eager=e.enforce_eager,
            enable_prefix_caching=e.enable_prefix_caching, max_num_seqs=e.max_num_seqs,
            rpc_timeout_s=sync_timeout_s, worker_extension_cls=worker_extension_cls,
            llm_kwargs=transport.engine_kwargs(),
        )  # fmt: skip
        self.receiver = transport.receiver(self.engine, worker_id, sync_timeout_s)
        self.sync_timeout_s = sync_timeout_s
        self._engine_lock = threading.Lock()  # held by a batch and by a weight load
        self._held = False  # the lock is held from a "start" stage to its "finish"
        self._cursor = 0  # next prompt index in the shard (wraps around)

    # ------------------------------------------------------------------ sampling
    def run_batch(self) -> dict[str, float]:
        """Generate one batch of prompts, send its rows to the sink, return `rollout/...` stats."""
        n = len(self.prompts)
        idx = [(self._cursor + i) % n for i in range(self.batch_size)]
        batch = [self.prompts[i] for i in idx]
        self._cursor = (self._cursor + self.batch_size) % n
        with self._engine_lock:
            version = self.engine.version
            t0 = time.perf_counter()
            rollouts = self.engine.generate(batch, self.params)
            gen_s = time.perf_counter() - t0
        self._send(to_rows(rollouts, version, self.worker_id))
        n_corr = self._send_corrections(rollouts, idx) if self.data_sink is not None else 0
        actions = sum(len(r.action_ids) for r in rollouts)
        backspaces = sum(r.num_backspaces for r in rollouts)
        return {
            "rollout/version": float(version),
            "rollout/rollouts": float(len(rollouts)),
            "rollout/actions": float(actions),
            "rollout/tokens_per_s": actions / max(gen_s, 1e-9),
            "rollout/backspace_rate": backspaces / max(actions, 1),
            "rollout/eos_rate": sum(r.finish_reason == "eos" for r in rollouts) / len(rollouts),
            "rollout/action_cap_rate": sum(r.finish_reason == "action_cap" for r in rollouts) / len(rollouts),
            "rollout/gen_s": gen_s,
            "rollout/correction_rows": float(n_corr),
        }

    def _send_corrections(self, rollouts: list[Rollout], idx: list[int]) -> int:
        """Expert rows from this batch's own mistakes to `data_sink` (rollout.correction_rows)."""
        from sm_dist.core.traces import self_correction
        from sm_dist.data.datasets import AugmentedExample, make_data_rows

        k = self.params.samples_per_prompt  # rollouts come ordered by (prompt, sample)
        fixes = []
        for j, r in enumerate(rollouts):
            target = list(map(int, self.targets[idx[j // k]]))
            fix = self_correction(r.final_ids, target, self.engine.bkspc_id, self.engine.eos_id)
            if fix is not None:
                fixes.append(AugmentedExample(r.prompt_ids, target, *fix))
        if fixes:  # the data pipeline's own row builder (it also checks each trace collapses to its target)
            prefix = f"{self.worker_id}-corr-{uuid.uuid4().hex}"
            self._send(make_data_rows(fixes, self.engine.bkspc_id, self.worker_id, prefix), self.data_sink)
        return len(fixes)

    def _send(self, rows: list[dict], sink: Any = None) -> None:
        sink = self.sink if sink is None else sink
        if sink is None:
            return
        from sm_dist.buffer.schema import rows_to_batch

        batch = rows_to_batch(rows)
        add = getattr(sink, "add", None)
        if add is not None and hasattr(add, "remote"):  # a Ray actor handle (a replay buffer)
            import ray

            try:
                ray.get(add.remote(batch), timeout=self.sink_timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                raise TimeoutError(
                    f"{self.worker_id}: sink did not accept a batch of {len(rows)} rows within "
                    f"{self.sink_timeout_s}s"
                ) from e
        else:
            sink(batch)

    # ------------------------------------------------------------------ weights
    def receive_weights(self, stage: str, info: Any = None, version: int | None = None) -> int:
        """The one entry point of weight sync: hand `stage` ("init" | "start" | "update" | "finish")
        to the transport's receiver; return the version now in use.

        The engine lock is taken at "start" and released at "finish" (or on an error), so a collective
        transport's weights land between batches; an "update" with no "start" before it (the object
        store sends only that) holds the lock for itself. A stage that waits for the current batch
        needs a threaded actor (max_concurrency >= 2) when batches run meanwhile."""
        lock = self._engine_lock
        if stage == "start" or (stage == "update" and not self._held):
            if not lock.acquire(timeout=self.sync_timeout_s):
                raise TimeoutError(
                    f"{self.worker_id}: the current batch did not end within {self.sync_timeout_s}s, so "
                    f"weights version {version} could not {stage}"
                )
            own = stage == "update"  # released below, after this one call
            self._held = not own
        else:
            own = False
        try:
            self.receiver.stage(stage, info, version)
        except BaseException:
            if self._held or own:
                self._held = False
                lock.release()
            raise
        if own or (stage == "finish" and self._held):
            self._held = False
            lock.release()
        return self.engine.version

    def generate(self, prompts: Sequence[Sequence[int]], params: RolloutParams) -> list[dict]:
        """Rollouts of `prompts` under the weights in use, sent nowhere (the held-out accuracy of
        run.eval_path, sm_dist/eval/heldout.py): plain dicts, so the caller needs no vLLM import."""
        with self._engine_lock:
            rollouts = self.engine.generate(prompts, params)
        keys = ("prompt_index", "final_ids", "action_ids", "finish_reason")
        return [{k: getattr(r, k) for k in keys} for r in rollouts]

    # ------------------------------------------------------------------ control
    def version(self) -> int:
        """The weights version in use (0: the model folder's); answers once the engine is built."""
        return self.engine.version

    def set_prompts(self, shard: PromptShard) -> int:
        """A new prompt shard (the workers were re-sharded after scaling); takes effect from the next
        batch. Returns the shard's size."""
        prompts, targets = shard.load(), shard.load_targets()
        self.prompts = _checked(self.worker_id, prompts, targets, self.data_sink is not None)
        self.targets = targets if self.data_sink is not None else self.targets
        self._cursor = 0
        return len(self.prompts)


# ---- run in a worker's process: `w.__ray_call__.remote(fn, *args)` (Ray passes the worker first)


def incarnation(_: object = None) -> str:
    """This process, `host:pid`: a worker Ray restarted answers with a new one."""
    return f"{socket.gethostname()}:{os.getpid()}"


def probe_logprobs(
    worker: RolloutWorker, prompt_ids: Sequence[int], action_ids: Sequence[int]
) -> list[float]:
    """Raw log-probs of `action_ids` after `prompt_ids` under the weights `worker` runs (a sync check),
    between two batches."""
    with worker._engine_lock:
        return worker.engine.score(prompt_ids, action_ids)
