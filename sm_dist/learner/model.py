"""A learner rank's model: loaded, then wrapped for data parallelism (`sm_dist.learner.learner.Learner`).

Loading: float32 on the rank's device; QLoRA: the base in 4 bits (CUDA only). FSDP2 over several ranks
(`meta_init`): rank 0 reads the weights into host memory and the others build the model with its
parameters on the meta device (no memory); `wrap` shards every rank's model, then rank 0's weights are
broadcast one tensor at a time and each rank keeps its shard (`fill_from_rank0`), so no rank ever holds
the whole float32 model on its GPU. DDP: the model is wrapped, and the step calls it through `DDPModel`.
Also the step's two collectives beside the model's own: the gradient norm and the NaN guard's vote.
"""

from __future__ import annotations

import logging

import torch

from sm_dist.config import LearnerConfig, ModelConfig
from sm_dist.learner import lora
from sm_dist.sync.stream import first_names

log = logging.getLogger(__name__)


class DDPModel:
    """What `loss_and_backward` sees under DDP: calls go through DDP (gradient all-reduce hooks),
    attributes (config, get_output_embeddings, set_attn_implementation) come from the HF model."""

    def __init__(self, ddp, inner):
        self.ddp, self.inner = ddp, inner

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def meta_init(lc: LearnerConfig, mc: ModelConfig, world_size: int, device: torch.device) -> bool:
    """FSDP2 over several ranks, weights in full precision, and parameters that can live on the
    device the broadcast runs on (CPU offload on CUDA would need the NCCL broadcast on host tensors:
    there every rank reads the folder into host memory and FSDP2 moves one layer at a time)."""
    offload_on_cuda = lc.cpu_offload and device.type == "cuda"
    sharded = lc.strategy == "fsdp2" and world_size > 1
    return sharded and not mc.load_in_4bit and not offload_on_cuda


def load_model(auto, model_dir: str, rank: int, device: torch.device, mc: ModelConfig, meta: bool):
    """The HF model of `model_dir` for learner `rank` (`auto`: transformers' AutoModelForCausalLM);
    `meta`: `meta_init`'s answer (the module docstring)."""
    if meta:
        if rank == 0:
            return auto.from_pretrained(model_dir, dtype=torch.float32)  # host memory
        from accelerate import init_empty_weights  # a peft dependency
        from transformers import AutoConfig

        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) stay real
            model = auto.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
        model.tie_weights()  # as from_pretrained does: a tied head shares its embedding (GPT-2)
        return model
    if not mc.load_in_4bit:
        return auto.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return _load_4bit(auto, model_dir, rank, device, mc)


def _load_4bit(auto, model_dir: str, rank: int, device: torch.device, mc: ModelConfig):
    """QLoRA's base: 4-bit layers (bitsandbytes) on CUDA, made ready for k-bit training."""
    from sm_dist.errors import UserError

    if device.type != "cuda":
        raise UserError(
            "model.load_in_4bit", f"QLoRA's 4-bit base needs CUDA; learner rank {rank} runs on {device}.",
            "run the learners on GPUs (learner.gpus_per_learner=1), or set model.load_in_4bit=false",
        )  # fmt: skip
    try:
        import bitsandbytes  # noqa: F401 -- transformers' 4-bit layers are bitsandbytes'
    except ImportError:
        raise UserError(
            "model.load_in_4bit", f"needs the bitsandbytes package, missing on learner rank {rank}.",
            "pip install bitsandbytes on the learner nodes (the GPU image), or set model.load_in_4bit=false",
        ) from None  # fmt: skip
    compute = lora.compute_dtype(mc.dtype)
    model = auto.from_pretrained(
        model_dir, quantization_config=lora.quantization_config(compute), dtype=compute,
        device_map={"": device},
    )  # fmt: skip
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def wrap(module, rank: int, device: torch.device, lc: LearnerConfig, mc: ModelConfig, meta: bool):
    """Shard `module` in place (FSDP2; `meta`: then fill it from rank 0) or wrap it (DDP); returns what
    the step calls (`module` itself under FSDP2, a `DDPModel` under DDP). The process group is joined."""
    if lc.strategy != "fsdp2":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDPModel(DDP(module, device_ids=ids), module)
    from sm_dist.learner.sharded import decoder_layers, fsdp_kwargs, fully_shard_model

    bf16 = mc.dtype == "bfloat16" and device.type == "cuda"
    kw = fsdp_kwargs(lc.cpu_offload, torch.bfloat16 if bf16 else None, device.type == "cuda")
    layers = decoder_layers(lora.hf_model(module))  # the model's own block class
    if not layers:
        log.warning(
            "FSDP2: %s names no decoder-layer class (_no_split_modules); only the root is "
            "sharded, so every forward gathers the whole model at once",
            type(lora.hf_model(module)).__name__,
        )
    full, buffers = {}, {}
    if meta and rank == 0:  # rank 0's host tensors, broadcast once the ranks are sharded
        sd = module.state_dict()  # torch's loader fills a shared tensor under its first name only
        full = {n: sd[n] for n in first_names(sd)}
        buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    fully_shard_model(module, layers, **kw)
    if meta:
        fill_from_rank0(module, rank, full, buffers, "cpu" if lc.cpu_offload else device)
    return module


def fill_from_rank0(module, rank: int, full: dict, buffers: dict, device) -> None:
    """After FSDP2 sharded the (meta) parameters: give every shard storage on `device`, broadcast
    rank 0's buffers (`to_empty` clears them too; PEFT's non-persistent ones were made from meta
    weights on the other ranks), then rank 0's weights one tensor at a time
    (`set_model_state_dict(..., broadcast_from_rank0=True)`); each rank keeps its own slice."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module.to_empty(device=device)
    with torch.no_grad():
        for name, b in module.named_buffers():  # the same order on every rank
            if rank == 0:
                b.copy_(buffers[name])
            dist.broadcast(b, src=0)
    # not strict: a tied tensor's second name (GPT-2's head, its PEFT row adapter) is filled by its first
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    missed = set_model_state_dict(module, full, options=opts)
    params = dict(module.named_parameters(remove_duplicate=False))
    filled = {id(p) for n, p in params.items() if n not in missed.missing_keys}
    lost = [k for k in missed.missing_keys if id(params.get(k)) not in filled]
    if lost or missed.unexpected_keys:
        raise RuntimeError(f"learner rank {rank}: rank 0's weights did not fill {lost or missed}")


def clip_grad_norm(module, clip_norm: float | None) -> float:
    """Clip the gradients of `module` to `clip_norm` (None: only measure); their total norm before."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """Is `flag` set on any rank (an all-reduce of it: every rank must call)?"""
    if world_size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
