"""The learner rank: a plain class (the driver applies `ray.remote`), one per data-parallel rank.

    ranks = [L.remote(r, M, model_dir, cfg.learner, cfg.objective, steps, seed, sync=cfg.sync) for r in range(M)]
    addr, port = ray.get(ranks[0].__ray_call__.remote(rendezvous_address))  # rank 0's node, a free port
    ray.get([l.join.remote(addr, port) for l in ranks])                      # the process group, AdamW
    metrics = ray.get([l.train_step.remote(data[r], replay[r]) for r, l in enumerate(ranks)])
    ray.get([l.publish_weights.remote(workers=ws, names=ns) for l in ranks])  # connect; again on changes
    delivery = ray.get([l.publish_weights.remote(v) for l in ranks])[0]       # rank 0's Delivery
    ray.get(ranks[0].publish_weights.remote(only=i))    # the last version again to restarted worker i

plus `save(ckpt_dir)` and `load(ckpt_dir)` on every rank (`sm_dist.orchestrator.actors.build_learners`
builds the ranks in placement-group bundles). One rank needs no `join`. `sm_dist.learner.calls` holds
what else runs in a learner's process (`rendezvous_address`, `write_token`, `step`, ...).

Normalisation (why M ranks with B/M rows each equal one rank with B rows): the objective takes
per-sequence means within each occupancy (data, model) and mixes them with fixed weights; DDP averages
gradients over ranks. The mean of M per-rank means equals the global mean exactly when every rank holds
the same number of data rows and the same number of model rows, so the driver splits each source
evenly (the config validator enforces divisibility). Gradient accumulation splits the same way.

NaN guard: `loss_and_backward` reports a non-finite loss only after its backward, so DDP's gradient
all-reduce has run on every rank; all ranks then agree through an all-reduce of a "bad" flag and skip
the optimiser step together (gradients discarded); `nan_tolerance` bad steps in a row raise.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sm_dist.config import LearnerConfig, ModelConfig, ObjectiveConfig, SyncConfig
from sm_dist.learner import checkpoint as ckpt
from sm_dist.learner import lora
from sm_dist.learner.model import DDPModel, any_rank, clip_grad_norm, load_model, meta_init, wrap
from sm_dist.learner.step import as_rows, loss_and_backward, lr_factor, objective_params, to_traces
from sm_dist.sync.stream import WeightStream, drain, from_state_dict, full_tensor, wire_order


@dataclass
class _Counters:
    step: int = 0  # train_step calls completed (the schedule's clock, skipped steps included)
    skipped: int = 0
    bad_in_a_row: int = 0
    sequences: int = 0


class Learner:
    """One data-parallel rank: HF model, AdamW, LR schedule, SequenceMatch step."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        model_dir: str,
        learner: LearnerConfig,
        objective: ObjectiveConfig,
        total_steps: int | None,
        seed: int = 0,
        device: str = "auto",
        sync: SyncConfig | None = None,
        model: ModelConfig | None = None,
    ):
        """`learner`, `objective`, `sync`, `model`: the run config's sections (None: the defaults).
        `model_dir` may be a LoRA checkpoint's adapter folder: its base loads, the state comes later."""
        from transformers import AutoTokenizer

        from sm_dist.core.vocab import get_bkspc_id

        self.rank, self.world_size = rank, world_size
        self.opt_p, self.total_steps = learner, total_steps
        self.sync = sync or SyncConfig()
        self.sender = None  # learner rank 0's end of the weight transport, after a connecting publish
        self._store: Any = None  # rank 0: the group's TCPStore, opened by `_host_store` before `join`
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        torch.manual_seed(seed)
        self.model_cfg = model_cfg = model or ModelConfig()
        self.weights_dtype = getattr(torch, model_cfg.dtype)  # what leaves the learner (syncs, model/)
        self._use_lora = model_cfg.lora.r > 0
        self._sharded = learner.strategy == "fsdp2" and world_size > 1  # parameters and AdamW state sharded
        self._meta = meta_init(learner, model_cfg, world_size, self.device)
        self.model_dir = lora.base_dir(str(model_dir))
        tok = self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.bkspc_id, self.eos_id = get_bkspc_id(tok), tok.eos_token_id
        self.module = self._model()  # the HF model (sharded in place under FSDP2)
        self.step_model: Any = self.module  # what the step calls (DDP proxy when world_size > 1)
        self.optimizer: Any = None  # built once the parameters are final (after FSDP2 shards them)
        self.step_params = objective_params(objective, learner, self.bkspc_id, self.device.type == "cuda")
        self.c = _Counters()
        if world_size == 1:
            self._build_optimizer()

    def _model(self):
        """The HF model (`sm_dist.learner.model.load_model`), checked for `<bkspc>`; LoRA's adapters on
        it, and activation checkpointing (before DDP/FSDP2 wrap the layers) when asked for."""
        from transformers import AutoModelForCausalLM

        from sm_dist.core.vocab import check_model_has_bkspc

        mc = self.model_cfg
        model = load_model(AutoModelForCausalLM, self.model_dir, self.rank, self.device, mc, self._meta)
        check_model_has_bkspc(model, self.bkspc_id)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        if self._use_lora:  # the base frozen; adapters + <bkspc> rows train (sm_dist.learner.lora)
            model = lora.apply_lora(model, mc.lora, self.bkspc_id)
        if self.opt_p.activation_checkpointing:
            from sm_dist.learner.sharded import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        return model

    def _build_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(
            [p for p in self.module.parameters() if p.requires_grad],  # LoRA: adapters + <bkspc> rows
            lr=self.opt_p.lr,
            betas=self.opt_p.betas,
            eps=self.opt_p.eps,
            weight_decay=self.opt_p.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.opt_p, self.total_steps)
        )

    def join(self, addr: str, port: int, timeout_s: float = 1800.0) -> None:
        """Join the ranks' process group at rank 0's `addr:port` (`rendezvous_address`, which opened
        rank 0's store there; every rank at once: it blocks until all have joined; the driver bounds
        that wait by run.startup_timeout_s), shard (FSDP2) or wrap (DDP) the model, then build the
        optimiser. The group's rendezvous and collectives time out after max(timeout_s, 30 min),
        torch's default. One rank: nothing to do."""
        import torch.distributed as dist

        if self.world_size == 1:  # no group: the constructor built the optimiser
            return
        if self.optimizer is not None:
            raise RuntimeError(f"learner rank {self.rank}: join called twice")
        timeout = _group_timeout(timeout_s)  # also every collective's
        if self.rank == 0 and self._store is None:
            self._host_store(addr, port, timeout_s)
        store = self._store or dist.TCPStore(addr, port, self.world_size, False, timeout=timeout)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout
        )
        self.step_model = wrap(self.module, self.rank, self.device, self.opt_p, self.model_cfg, self._meta)
        self._build_optimizer()

    def _host_store(self, addr: str, port: int, timeout_s: float = 1800.0) -> int:
        """Rank 0: open the group's TCPStore on `addr:port` (0: a port the OS picks) and keep it for
        `join`; returns the port it listens on."""
        import torch.distributed as dist

        self._store = dist.TCPStore(addr, port, self.world_size, True, timeout=_group_timeout(timeout_s),
                                    wait_for_workers=False)  # fmt: skip
        return self._store.port

    # ---- training -----------------------------------------------------------------------------------

    def train_step(self, data_rows, replay_rows=None) -> dict[str, float]:
        """One optimiser step on this rank's rows (Arrow batch or list of dicts each); returns metrics."""
        t0 = time.perf_counter()
        if self.optimizer is None:
            raise RuntimeError(f"learner rank {self.rank} of {self.world_size}: join the process group first")
        data, replay = as_rows(data_rows), as_rows(replay_rows)
        if not data and not replay:
            raise ValueError(f"learner rank {self.rank}: train_step got no rows")
        g = self.opt_p.grad_accum
        micro = [m for m in (data[i::g] + replay[i::g] for i in range(g)) if m]
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics, bad = self._accumulate(micro)
        grad_norm = clip_grad_norm(self.module, self.opt_p.clip_norm)
        self._apply_or_skip(any_rank(bad or not math.isfinite(grad_norm), self.world_size, self.device))
        self.scheduler.step()
        self.c.step += 1
        self.c.sequences += len(data) + len(replay)
        metrics.update(
            {
                "learner/step": float(self.c.step),
                "learner/lr": self.scheduler.get_last_lr()[0],
                "learner/grad_norm": grad_norm,
                "learner/skipped_total": float(self.c.skipped),
                "learner/data_rows": float(len(data)),
                "learner/replay_rows": float(len(replay)),
                "perf/learner_step_s": time.perf_counter() - t0,
            }
        )
        return metrics

    def _accumulate(self, micro: list[list[dict]]) -> tuple[dict[str, float], bool]:
        """Forward and backward of every micro-batch (DDP all-reduces after the last one only); the
        mean metrics, and whether a loss was not finite."""
        metrics: dict[str, float] = {}
        bad = False
        for i, rows in enumerate(micro):
            last = i == len(micro) - 1
            ddp = isinstance(self.step_model, DDPModel)
            with self.step_model.ddp.no_sync() if (not last and ddp) else nullcontext():
                try:
                    traces = to_traces(rows, self.bkspc_id, self.eos_id, self.vocab_size)
                    m = loss_and_backward(
                        self.step_model, traces, self.step_params, self.c.step, 1.0 / len(micro)
                    )
                except FloatingPointError as e:
                    bad, m = True, {"learner/error": 1.0}
                    self._last_error = str(e)
                    # loss_and_backward raises only after its backward (DDP's all-reduce already ran on
                    # every rank, so ranks stay in step); the gradients are discarded by the caller.
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(micro)
        return metrics, bad

    def _apply_or_skip(self, bad: bool) -> None:
        """The optimiser step, or (a non-finite step on any rank) discard the gradients; raise after
        `nan_tolerance` bad steps in a row."""
        if not bad:
            self.optimizer.step()
            self.c.bad_in_a_row = 0
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.c.skipped += 1
        self.c.bad_in_a_row += 1
        if self.c.bad_in_a_row >= self.opt_p.nan_tolerance:
            raise FloatingPointError(
                f"learner rank {self.rank}: {self.c.bad_in_a_row} non-finite steps in a row at step "
                f"{self.c.step} (learner.nan_tolerance={self.opt_p.nan_tolerance}); last: "
                f"{getattr(self, '_last_error', 'non-finite grad norm')}. Lower learner.lr or "
                "objective.divergence.chi2_weight"
            )

    # ---- weights and checkpoints ----------------------------------------------------------------------

    def _read_whole(self, stream: WeightStream, cpu: bool = False) -> dict[str, torch.Tensor]:
        """`stream` read whole on rank 0 (on CPU in its wire dtypes with `cpu`); the other ranks only take
        part in its gathers under FSDP2 and get {}. Call on every rank."""
        if self.rank != 0:
            if self._sharded:
                drain(stream)
            return {}
        return {s.name: stream.read(s.name).to("cpu", s.dtype) if cpu else stream.read(s.name)
                for s in wire_order(stream.specs)}  # fmt: skip

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """HF-named CPU tensors of the whole model in model.dtype, a tied head once (a collective under
        FSDP2, gathered one tensor at a time: call on every rank; the ranks other than 0 get {})."""
        return self._read_whole(from_state_dict(self.module.state_dict(), self.weights_dtype), cpu=True)

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """LoRA: the adapter's own tensors whole on CPU (every rank gathers each under FSDP2; the others
        get {})."""
        if self.rank != 0 and not self._sharded:
            return {}
        parts = lora.adapter_state_dict(self.module.state_dict())
        whole = {k: full_tensor(v).cpu() for k, v in parts.items()}
        return whole if self.rank == 0 else {}

    def _sync_state_dict(self) -> dict[str, torch.Tensor]:
        """What a publish sends, made whole (tests and tools; call on every rank under FSDP2)."""
        return self._read_whole(self._weights())

    def _weights(self) -> WeightStream:
        """The weights to publish, as a stream (sm_dist.sync.stream): nothing is gathered or merged until
        the sender reads it, one tensor at a time, in model.dtype. Under FSDP2 each read all-gathers one
        parameter, so rank 0 never holds the whole model beside its wire buffer. LoRA: the merged
        weights under HF names (`lora.merged_stream`)."""
        if self._use_lora:
            return lora.merged_stream(self.module, lora.live_state_dict(self.module), self.weights_dtype)
        return from_state_dict(self.module.state_dict(), self.weights_dtype)

    def publish_weights(
        self, version: int | None = None, *, workers: list | None = None, names: list[str] | None = None,
        only: int | None = None,
    ):  # fmt: skip
        """Send the current weights as `version` to the connected rollout workers: rank 0's
        `sm_dist.sync.base.Delivery`, None on the other ranks. Call on every rank: under FSDP2 the others
        take part in each tensor's all-gather while rank 0's sender reads the stream.

        `workers`, `names`: first (re)connect rank 0's end of `sync.transport` to these workers (at the
        start, and again whenever the workers change; a collective rendezvouses anew, at this node's
        address; the object store keeps its last version); `version=None` then sends nothing.
        `only=i` (rank 0 alone, no `version`): the last version sent, again to worker `i`, which
        restarted with its initial weights."""
        if only is not None:
            if version is not None or workers is not None:
                raise ValueError(
                    "publish_weights(only=i) re-sends the last version: give no version or workers"
                )
            return self.sender.resend(only) if self.rank == 0 else None
        if workers is not None:
            self._connect(workers, names or [])
        if version is None:
            return None
        if self.rank != 0:
            if self._sharded:  # each tensor's all-gather needs every rank
                self._read_whole(self._weights())
            return None
        if self.sender is None:
            raise RuntimeError("publish_weights before the workers were connected (give workers= and names=)")
        if self.sync.transport.kind == "nccl":  # reads the connected module's own tensors (no LoRA, no FSDP2)
            return self.sender.send(version, self.module.state_dict())
        stream = self._weights()
        delivery = self.sender.send(version, stream)
        delivery.metrics["sync/model_bytes"] = float(stream.nbytes)
        return delivery

    def _connect(self, workers: list, names: list[str]) -> None:
        """Rank 0 builds its end of `sync.transport` (anew for a collective) and connects it; the
        others keep nothing."""
        if self.rank == 0:
            if self.sender is None or self.sync.transport.collective:  # a collective rendezvouses anew
                self.sender = self.sync.transport.sender(self.sync.timeout_s)
            # the object store keeps its last version; weights travel in model.dtype
            self.sender.connect(workers, names, self.module, dtype=self.weights_dtype)

    def save(self, ckpt_dir: str) -> dict:
        """Every rank writes its own shard of the model and optimiser state to `state/` (DCP,
        `sm_dist.learner.sharded`: nothing is gathered on one rank); then rank 0 writes `model/` (an HF
        folder vLLM can load: the weights alone are gathered) and `learner_state.json`. Call on every
        rank. Nothing is copied from the folder the model came from: a checkpoint `keep_last` may have
        pruned since. Returns this rank's seconds and bytes written (rank 0: also the state)."""
        from sm_dist.learner import sharded

        out, t0 = Path(ckpt_dir), time.perf_counter()
        (lora if self._use_lora else sharded).save_state(self.module, self.optimizer, out / "state")
        own = sum(f.stat().st_size for f in (out / "state").glob(f"__{self.rank}_*.distcp"))
        figures = {"rank": self.rank, "state_bytes": own, "state_s": time.perf_counter() - t0}
        # weights only, gathered one tensor at a time (collectives under FSDP2); LoRA: the adapter alone
        sd = self._adapter_tensors() if self._use_lora else self._full_state_dict()
        if self.rank != 0:
            return figures
        (out / "model").mkdir(parents=True, exist_ok=True)
        if self._use_lora:  # the adapter and the <bkspc> rows; adapter_config.json names the base folder
            lora.save_adapter(self.module, out / "model", sd)
        else:  # an HF folder in model.dtype (the state/ shards keep the float32 master weights)
            self.module.save_pretrained(out / "model", state_dict=sd, safe_serialization=True)
        self.tokenizer.save_pretrained(out / "model")
        state = {
            ckpt.VERSION_KEY: ckpt.VERSION,
            "step": self.c.step,
            "skipped": self.c.skipped,
            "sequences": self.c.sequences,
            "world_size": self.world_size,
            "strategy": self.opt_p.strategy,
            "scheduler": self.scheduler.state_dict(),
            "optim": self.opt_p.model_dump(mode="json"),
        }
        (out / "learner_state.json").write_text(json.dumps(state, indent=1))
        return {**state, **figures, "save_s": time.perf_counter() - t0}

    def load(self, ckpt_dir: str) -> int:
        """Restore weights, optimizer, scheduler and counters on every rank from `state/` (whatever
        strategy and number of ranks wrote it); return the step. A checkpoint of another format version
        (`checkpoint.VERSION`), or a file that would unpickle code, is refused with a `CheckpointError`."""
        from sm_dist.errors import CheckpointError
        from sm_dist.learner import sharded

        d = Path(ckpt_dir)
        ckpt.check_version(d)
        st = json.loads((d / "learner_state.json").read_text())
        try:
            (lora if self._use_lora else sharded).load_state(self.module, self.optimizer, d / "state")
        except pickle.UnpicklingError as e:  # UnsafeCheckpoint, or torch.load(weights_only=True)'s refusal
            raise CheckpointError(
                str(d), f"refused to load it: {sharded.one_line(e)}",
                "resume only from checkpoints you trust to hold tensors alone; sm-dist never unpickles code",
            ) from None  # fmt: skip
        self.scheduler.load_state_dict(st["scheduler"])
        self.c.step, self.c.skipped, self.c.sequences = st["step"], st["skipped"], st["sequences"]
        return self.c.step


def _group_timeout(timeout_s: float):
    import datetime as dt

    return dt.timedelta(seconds=max(timeout_s, 1800.0))
