"""The learner rank: a plain class (the driver applies `ray.remote`), one per data-parallel rank.

    Learner = ray.remote(num_cpus=1)(Learner)
    ranks = [Learner.remote(r, M, model_dir, cfg.learner, cfg.objective, steps, seed, sync=cfg.sync)
             for r in range(M)]
    addr, port = ray.get(ranks[0].rendezvous_address.remote())   # rank 0's own node, a port free there
    ray.get([l.init_distributed.remote(addr, port) for l in ranks])    # the process group, then AdamW
    metrics = ray.get([l.train_step.remote(data_shard[r], replay_shard[r]) for r, l in enumerate(ranks)])
    ray.get([l.connect_weights.remote(workers, names) for l in ranks])    # once
    delivery = ray.get([l.publish_weights.remote(version) for l in ranks])[0]  # rank 0's Delivery

(`sm_dist.orchestrator.actors.build_learners` does the above in placement-group bundles.) With one rank the
constructor builds the optimiser itself and `init_distributed` is not needed.

Public methods: `rendezvous_address`, `init_distributed`, `train_step`, `connect_weights`, `publish_weights`, `resend_weights`,
`save_checkpoint`, `load_checkpoint`.

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
import logging
import math
import os
import pickle
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sm_dist.config import LearnerConfig, ModelConfig, ObjectiveConfig, SyncConfig
from sm_dist.core.traces import TraceInputs, build_inputs
from sm_dist.learner import lora
from sm_dist.learner.step import StepParams, loss_and_backward
from sm_dist.sync.stream import WeightStream, drain, from_state_dict, full_tensor, wire_order

log = logging.getLogger(__name__)


def lr_factor(step: int, p: LearnerConfig, total_steps: int | None) -> float:
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at `total_steps` (or constant)."""
    if step < p.lr_warmup_steps:
        return (step + 1) / p.lr_warmup_steps
    if p.schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError("a cosine schedule needs total_steps; with total_steps=None use schedule='constant'")
    span = max(1, total_steps - p.lr_warmup_steps)
    frac = min(1.0, (step - p.lr_warmup_steps) / span)
    return p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def objective_params(o: ObjectiveConfig, lc: LearnerConfig, bkspc_id: int, on_gpu: bool) -> StepParams:
    """The one place the config becomes the pure-torch step's frozen parameters."""
    return StepParams(
        objective=o.params(bkspc_id),
        warmup_steps=o.warmup_steps,
        sm_lambda=o.sm_lambda,
        attn=lc.attn,
        autocast_dtype=torch.bfloat16 if (on_gpu and lc.bf16_autocast) else None,
        pad_to_multiple=8 if on_gpu else 1,
        loss_chunk_size=lc.loss_chunk_size,
        pack=lc.pack,
        pack_length=lc.pack_length,
    )  # fmt: skip


def noise_flags(action_ids: list[int], bkspc_id: int) -> list[bool]:
    """Schema v1 rows only (no stored flags): a token directly followed by `<bkspc>` was an injected
    mistake, as `augment_noise` writes them (DESIGN §2). Rows of schema v2 carry `is_noise`."""
    n = len(action_ids)
    return [a != bkspc_id and i + 1 < n and action_ids[i + 1] == bkspc_id for i, a in enumerate(action_ids)]


def _data_noise(row: dict, acts: list[int], bkspc_id: int) -> list[bool] | None:
    """A data row's noise flags: its `is_noise` column, or v1's rule when a v1 row has none."""
    flags = row.get("is_noise") or []
    if flags:
        return list(flags)
    return noise_flags(acts, bkspc_id) if bkspc_id in acts else None


def _as_rows(rows) -> list[dict]:
    """list[dict] | pa.RecordBatch | pa.Table | None -> list of dict rows."""
    if rows is None:
        return []
    if isinstance(rows, list):
        return rows
    from sm_dist.buffer.schema import batch_to_rows

    return batch_to_rows(rows)


class _DDPModel:
    """What `loss_and_backward` sees under DDP: calls go through DDP (gradient all-reduce hooks),
    attributes (config, get_output_embeddings, set_attn_implementation) come from the HF model."""

    def __init__(self, ddp, inner):
        self.ddp, self.inner = ddp, inner

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@dataclass
class _Counters:
    step: int = 0  # train_step calls completed (the schedule's clock, skipped steps included)
    skipped: int = 0
    bad_in_a_row: int = 0
    sequences: int = 0
    history: list = field(default_factory=list)


def _unaliased(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` without the later names of a tensor it holds twice (a tied head): torch's state-dict loader
    fills a shared parameter under its first name only."""
    seen: set[tuple] = set()
    out = {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen or v.numel() == 0:
            seen.add(key)
            out[k] = v
    return out


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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sm_dist.core.vocab import check_model_has_bkspc, get_bkspc_id

        self.rank, self.world_size, self.model_dir = rank, world_size, str(model_dir)
        self.opt_p, self.total_steps = learner, total_steps
        self.sync = sync or SyncConfig()
        self.sender = None  # learner rank 0's end of the weight transport, after connect_weights
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.model_cfg = model_cfg = model or ModelConfig()
        self.weights_dtype = getattr(torch, model_cfg.dtype)  # what leaves the learner (syncs, model/)
        self.model_dir = lora.base_dir(self.model_dir)
        tok = self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.bkspc_id, self.eos_id = get_bkspc_id(tok), tok.eos_token_id
        model = self._load_model(AutoModelForCausalLM)
        check_model_has_bkspc(model, self.bkspc_id)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        if self.use_lora:  # the base frozen; adapters + <bkspc> rows train (sm_dist.learner.lora)
            model = lora.apply_lora(model, model_cfg.lora, self.bkspc_id)
        if learner.activation_checkpointing:  # before DDP/FSDP2 wrap the layers
            from sm_dist.learner.sharded import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        self.module = model  # the HF model (sharded in place under FSDP2)
        self.step_model: Any = model  # what the step calls (DDP proxy when world_size > 1)
        self.rendezvous: tuple[str, int] | None = None  # where the process group met (rank 0's choice)
        self.optimizer: Any = None  # built once the parameters are final (after FSDP2 shards them)
        self.step_params = objective_params(objective, learner, self.bkspc_id, self.device.type == "cuda")
        self.c = _Counters()
        if world_size == 1:
            self._build_optimizer()

    @property
    def use_lora(self) -> bool:
        return self.model_cfg.lora.r > 0

    def _load_model(self, auto):
        """The HF model in float32 on this rank's device; QLoRA: its base in 4 bits (CUDA only). FSDP2
        over several ranks: rank 0 reads the weights into host memory and the others build the model
        with its parameters on the meta device (no memory); `_wrap` shards every rank's model, then
        rank 0's weights are broadcast one tensor at a time and each rank keeps its shard, so no rank
        ever holds the whole float32 model on its GPU (`_fill_from_rank0`)."""
        if self._meta_init:
            if self.rank == 0:
                return auto.from_pretrained(self.model_dir, dtype=torch.float32)  # host memory
            from accelerate import init_empty_weights  # a peft dependency
            from transformers import AutoConfig

            with init_empty_weights(include_buffers=False):  # buffers (rotary tables) stay real
                model = auto.from_config(AutoConfig.from_pretrained(self.model_dir), dtype=torch.float32)
            model.tie_weights()  # as from_pretrained does: a tied head shares its embedding (GPT-2)
            return model
        if not self.model_cfg.load_in_4bit:
            return auto.from_pretrained(self.model_dir, dtype=torch.float32).to(self.device)
        if self.device.type != "cuda":
            from sm_dist.errors import UserError

            raise UserError(
                "model.load_in_4bit", f"QLoRA's 4-bit base needs CUDA; learner rank {self.rank} runs on {self.device}.",
                "run the learners on GPUs (learner.gpus_per_learner=1), or set model.load_in_4bit=false",
            )  # fmt: skip
        try:
            import bitsandbytes  # noqa: F401 -- transformers' 4-bit layers are bitsandbytes'
        except ImportError:
            from sm_dist.errors import UserError

            raise UserError(
                "model.load_in_4bit", f"needs the bitsandbytes package, missing on learner rank {self.rank}.",
                "pip install bitsandbytes on the learner nodes (the GPU image), or set model.load_in_4bit=false",
            ) from None  # fmt: skip
        compute = lora.compute_dtype(self.model_cfg.dtype)
        model = auto.from_pretrained(
            self.model_dir, quantization_config=lora.quantization_config(compute), dtype=compute,
            device_map={"": self.device},
        )  # fmt: skip
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

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

    def rendezvous_address(self, port: int | None = None) -> tuple[str, int]:
        """Rank 0: where the ranks' process group meets, chosen once: this node's address (the one Ray
        knows it by) and `port` (learner.master_port), or a port free on this node now."""
        from sm_dist.orchestrator.cluster import free_port, node_ip_address

        if self.rendezvous is None:
            addr = node_ip_address()
            self.rendezvous = (addr, port or free_port(addr))
        return self.rendezvous

    def init_distributed(self, addr: str, port: int, timeout_s: float = 1800.0) -> None:
        """Join the ranks' process group at rank 0's `addr:port` (every rank at once: it blocks until all
        have joined; the driver bounds that wait by run.startup_timeout_s), shard (FSDP2) or wrap (DDP)
        the model, then build the optimiser. The group's rendezvous and collectives time out after
        max(timeout_s, 30 min), torch's default."""
        import datetime as dt

        import torch.distributed as dist

        self.rendezvous = (addr, port)
        if self.world_size == 1:  # no group: the constructor built the optimiser
            return
        if self.optimizer is not None:
            raise RuntimeError(f"learner rank {self.rank}: init_distributed called twice")
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{addr}:{port}", rank=self.rank, world_size=self.world_size,
            timeout=dt.timedelta(seconds=max(timeout_s, 1800.0)),  # also every collective's
        )  # fmt: skip
        self._wrap()
        self._build_optimizer()

    def _wrap(self) -> None:
        if self.opt_p.strategy == "fsdp2":
            from sm_dist.learner.sharded import decoder_layers, fsdp_kwargs, fully_shard_model

            bf16 = self.model_cfg.dtype == "bfloat16" and self.device.type == "cuda"
            kw = fsdp_kwargs(
                self.opt_p.cpu_offload, torch.bfloat16 if bf16 else None, self.device.type == "cuda"
            )
            layers = decoder_layers(lora.hf_model(self.module))  # the model's own block class
            if not layers:
                log.warning(
                    "FSDP2: %s names no decoder-layer class (_no_split_modules); only the root is "
                    "sharded, so every forward gathers the whole model at once",
                    type(lora.hf_model(self.module)).__name__,
                )
            full = _unaliased(self.module.state_dict()) if self.rank == 0 else {}  # host tensors (meta init)
            buffers = (
                {n: b.detach().clone() for n, b in self.module.named_buffers()} if self.rank == 0 else {}
            )
            fully_shard_model(self.module, layers, **kw)
            if self._meta_init:
                self._fill_from_rank0(full, buffers)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_model = _DDPModel(DDP(self.module, device_ids=ids), self.module)

    @property
    def _meta_init(self) -> bool:
        """FSDP2 over several ranks, weights in full precision, and parameters that can live on the
        device the broadcast runs on (CPU offload on CUDA would need the NCCL broadcast on host tensors:
        there every rank reads the folder into host memory and FSDP2 moves one layer at a time)."""
        offload_on_cuda = self.opt_p.cpu_offload and self.device.type == "cuda"
        return self.sharded and not self.model_cfg.load_in_4bit and not offload_on_cuda

    def _fill_from_rank0(self, full: dict, buffers: dict) -> None:
        """After FSDP2 sharded the (meta) parameters: give every shard storage on its device, broadcast
        rank 0's buffers (`to_empty` clears them too; PEFT's non-persistent ones were made from meta
        weights on the other ranks), then rank 0's weights one tensor at a time
        (`set_model_state_dict(..., broadcast_from_rank0=True)`); each rank keeps its own slice."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        self.module.to_empty(device="cpu" if self.opt_p.cpu_offload else self.device)
        with torch.no_grad():
            for name, b in self.module.named_buffers():  # the same order on every rank
                if self.rank == 0:
                    b.copy_(buffers[name])
                dist.broadcast(b, src=0)
        # not strict: a tied tensor's second name (GPT-2's head, its PEFT row adapter) is filled by its first
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        missed = set_model_state_dict(self.module, full, options=opts)
        params = dict(self.module.named_parameters(remove_duplicate=False))
        filled = {id(p) for n, p in params.items() if n not in missed.missing_keys}
        lost = [k for k in missed.missing_keys if id(params.get(k)) not in filled]
        if lost or missed.unexpected_keys:
            raise RuntimeError(f"learner rank {self.rank}: rank 0's weights did not fill {lost or missed}")

    # ---- training -----------------------------------------------------------------------------------

    def traces(self, rows: list[dict]) -> list[TraceInputs]:
        """Buffer rows -> single-pass layouts; data rows carry their noise flags, model rows none."""
        out = []
        for r in rows:
            is_data = r["source"] == "data"
            acts = list(r["action_ids"])
            out.append(
                build_inputs(
                    r["prompt_ids"],
                    acts,
                    self.bkspc_id,
                    eos_id=self.eos_id,
                    vocab_size=self.vocab_size,
                    is_noise=_data_noise(r, acts, self.bkspc_id) if is_data else None,
                    from_data=is_data,
                )
            )
        return out

    def train_step(self, data_rows, replay_rows=None) -> dict[str, float]:
        """One optimiser step on this rank's rows (Arrow batch or list of dicts each); returns metrics."""
        t0 = time.perf_counter()
        if self.optimizer is None:
            raise RuntimeError(f"learner rank {self.rank} of {self.world_size}: init_distributed first")
        data, replay = _as_rows(data_rows), _as_rows(replay_rows)
        if not data and not replay:
            raise ValueError(f"learner rank {self.rank}: train_step got no rows")
        g = self.opt_p.grad_accum
        micro = [data[i::g] + replay[i::g] for i in range(g)]
        micro = [m for m in micro if m]
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        bad = False
        for i, rows in enumerate(micro):
            last = i == len(micro) - 1
            ctx = (
                self.step_model.ddp.no_sync()
                if (not last and isinstance(self.step_model, _DDPModel))
                else nullcontext()
            )
            with ctx:
                try:
                    m = loss_and_backward(
                        self.step_model, self.traces(rows), self.step_params, self.c.step, 1.0 / len(micro)
                    )
                except FloatingPointError as e:
                    bad, m = True, {"learner/error": 1.0}
                    self._last_error = str(e)
                    # loss_and_backward raises only after its backward (DDP's all-reduce already ran on
                    # every rank, so ranks stay in step); the gradients are discarded below.
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(micro)
        grad_norm = self._clip()
        self._apply_or_skip(self._any_rank(bad or not math.isfinite(grad_norm)))
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

    def _clip(self) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.opt_p.clip_norm if self.opt_p.clip_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    # ---- weights and checkpoints ----------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """FSDP2 over more than one rank: parameters and optimiser state are sharded."""
        return self.opt_p.strategy == "fsdp2" and self.world_size > 1

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """HF-named CPU tensors of the whole model in model.dtype, a tied head once (a collective under
        FSDP2, gathered one tensor at a time: call on every rank; the ranks other than 0 get {})."""
        stream = from_state_dict(self.module.state_dict(), self.weights_dtype)
        if self.rank != 0:
            if self.sharded:
                drain(stream)
            return {}
        return {s.name: stream.read(s.name).to("cpu", s.dtype) for s in wire_order(stream.specs)}

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """LoRA: the adapter's own tensors whole on CPU (every rank gathers each; the others get {})."""
        parts = lora.adapter_state_dict(self.module.state_dict())
        whole = {k: full_tensor(v).cpu() for k, v in parts.items()}
        return whole if self.rank == 0 else {}

    def _sync_state_dict(self) -> dict[str, torch.Tensor]:
        """What a publish sends, made whole (tests and tools; call on every rank under FSDP2: the
        others get {})."""
        stream = self._weights()
        if self.rank != 0:
            if self.sharded:
                drain(stream)
            return {}
        return dict(stream.items())

    def _weights(self) -> WeightStream:
        """The weights to publish, as a stream (sm_dist.sync.stream): nothing is gathered or merged until
        the sender reads it, one tensor at a time, in model.dtype. Under FSDP2 each read all-gathers one
        parameter, so rank 0 never holds the whole model beside its wire buffer. LoRA: the merged
        weights under HF names (`lora.merged_stream`)."""
        if self.use_lora:
            return lora.merged_stream(self.module, lora.live_state_dict(self.module), self.weights_dtype)
        return from_state_dict(self.module.state_dict(), self.weights_dtype)

    def connect_weights(self, workers: list, names: list[str]) -> None:
        """Rank 0 builds its end of `sync.transport` and connects it to the rollout workers (a
        collective rendezvouses here, at this node's address); other ranks keep nothing. Call on every
        rank; again after the workers change (scaling: the sender keeps its last version for `resend`)."""
        if self.rank == 0:
            if self.sender is None or self.sync.transport.collective:  # a collective rendezvouses anew
                self.sender = self.sync.transport.sender(self.sync.timeout_s)
            # the object store keeps its last version; weights travel in model.dtype
            self.sender.connect(workers, names, self.module, dtype=self.weights_dtype)

    def publish_weights(self, version: int):
        """Send the current weights as `version` (`sm_dist.sync.base.Delivery` on rank 0, None on the
        others). Call on every rank: under FSDP2 the others take part in each tensor's all-gather while
        rank 0's sender reads the stream."""
        if self.rank != 0:
            if self.sharded:
                drain(self._weights())
            return None
        if self.sender is None:
            raise RuntimeError("publish_weights before connect_weights")
        if self.sync.transport.kind == "nccl":  # reads the connected module's own tensors (no LoRA, no FSDP2)
            return self.sender.send(version, self.module.state_dict())
        stream = self._weights()
        delivery = self.sender.send(version, stream)
        delivery.metrics["sync/model_bytes"] = float(stream.nbytes)
        return delivery

    def resend_weights(self, index: int):
        """Rank 0: the last version again to worker `index` (restarted with its initial weights)."""
        return self.sender.resend(index)

    def save_checkpoint(self, ckpt_dir: str) -> dict:
        """Every rank writes its own shard of the model and optimiser state to `state/` (DCP,
        `sm_dist.learner.sharded`: nothing is gathered on one rank); then rank 0 writes `model/` (an HF
        folder vLLM can load: the weights alone are gathered) and `learner_state.json`. Call on every
        rank. Nothing is copied from the folder the model came from: a checkpoint `keep_last` may have
        pruned since. Returns this rank's seconds and bytes written (rank 0: also the state)."""
        from sm_dist.learner import sharded

        out, t0 = Path(ckpt_dir), time.perf_counter()
        (lora if self.use_lora else sharded).save_state(self.module, self.optimizer, out / "state")
        own = sum(f.stat().st_size for f in (out / "state").glob(f"__{self.rank}_*.distcp"))
        figures = {"rank": self.rank, "state_bytes": own, "state_s": time.perf_counter() - t0}
        # weights only, gathered one tensor at a time (collectives under FSDP2); LoRA: the adapter alone
        sd = self._adapter_tensors() if self.use_lora else self.full_state_dict()
        if self.rank != 0:
            return figures
        (out / "model").mkdir(parents=True, exist_ok=True)
        if self.use_lora:  # the adapter and the <bkspc> rows; adapter_config.json names the base folder
            lora.save_adapter(self.module, out / "model", sd)
        else:  # an HF folder in model.dtype (the state/ shards keep the float32 master weights)
            self.module.save_pretrained(out / "model", state_dict=sd, safe_serialization=True)
        self.tokenizer.save_pretrained(out / "model")
        state = {
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

    def load_checkpoint(self, ckpt_dir: str) -> int:
        """Restore weights, optimizer, scheduler and counters on every rank (from `state/`, whatever
        strategy and number of ranks wrote it; or a legacy `optimizer.pt` + `model/`); return the step.
        A file that would unpickle code is refused with a `CheckpointError`."""
        from sm_dist.errors import CheckpointError
        from sm_dist.learner import sharded

        d = Path(ckpt_dir)
        st = json.loads((d / "learner_state.json").read_text())
        try:
            if (d / "state").is_dir():
                (lora if self.use_lora else sharded).load_state(self.module, self.optimizer, d / "state")
                self.scheduler.load_state_dict(st["scheduler"])
            else:
                self._load_legacy(d)
        except pickle.UnpicklingError as e:  # UnsafeCheckpoint, or torch.load(weights_only=True)'s refusal
            raise CheckpointError(
                str(d), f"refused to load it: {sharded.one_line(e)}",
                "resume only from checkpoints you trust to hold tensors alone; sm-dist never unpickles code",
            ) from None  # fmt: skip
        self.c.step, self.c.skipped, self.c.sequences = st["step"], st["skipped"], st["sequences"]
        return self.c.step

    def _load_legacy(self, d: Path) -> None:
        """A checkpoint from before `state/`: full weights in `model/`, the optimiser in optimizer.pt
        (loaded with weights_only=True: tensors and plain containers only)."""
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in sorted((d / "model").glob("*.safetensors")):
            sd.update(load_file(str(f)))
        opt = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_model_state_dict(self.module, sd, options=opts)
            set_optimizer_state_dict(self.module, self.optimizer, opt["optimizer"], options=opts)
        else:
            missing, unexpected = self.module.load_state_dict(sd, strict=False)
            real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
            if real_missing or unexpected:
                raise RuntimeError(
                    f"checkpoint {d} does not match the model: missing {real_missing[:5]}, unexpected {unexpected[:5]}"
                )
            self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])

    def get_step(self) -> int:
        return self.c.step

    def write_token(self, path: str, token: str) -> str:
        """Write `token` to `path` (fsynced; folders made) and return this rank's node address: the
        driver reads it back to check that `run.run_dir` is one storage for every node
        (`sm_dist.orchestrator.storage`)."""
        from sm_dist.orchestrator.cluster import node_ip_address

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
        return node_ip_address()

    def local_param_numel(self) -> int:
        """Parameter elements this rank holds (its shard under FSDP2, everything under DDP)."""
        return sum(getattr(p, "_local_tensor", p).numel() for p in self.module.parameters())
