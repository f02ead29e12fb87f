"""learner.activation_checkpointing, learner.cpu_offload and FSDP2's MixedPrecisionPolicy on two gloo
ranks (plain torch.multiprocessing, no Ray): the sharded step's gradients equal one unsharded process's.
FSDP2 wraps each model's own decoder-layer class (Llama, Qwen2, GPT-2; also under PEFT)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from sm_dist.core.objective import ObjectiveParams
from sm_dist.core.traces import build_inputs
from sm_dist.learner.sharded import (
    decoder_layers,
    enable_activation_checkpointing,
    fsdp_kwargs,
    fully_shard_model,
)
from sm_dist.learner.step import StepParams, loss_and_backward

from .equivalence import random_traces, tiny_models

V, BK = 32, 31


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _step(model) -> float:
    traces = [build_inputs(p, a, BK, from_data=i % 2 == 0) for i, (p, a) in
              enumerate(random_traces(8, seed=1, bkspc=BK, max_steps=12))]  # fmt: skip
    p = StepParams(ObjectiveParams(bkspc_id=BK), attn="split", loss_chunk_size=8, pack=True)
    return loss_and_backward(model, traces, p, step=0)["loss/total"]


CASES = [(True, False, 1e-5), (False, True, 5e-2)]  # (cpu_offload, bf16 params, tolerance)


def _rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    # a file store: no port to choose and lose to another process before rank 0 binds it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = []
    for offload, bf16, _ in CASES:
        model = _model()
        enable_activation_checkpointing(model)
        model.train()
        kw = fsdp_kwargs(offload, torch.bfloat16 if bf16 else None, on_cuda=False)
        fully_shard_model(model, decoder_layers(model), **kw)
        loss = _step(model)  # every rank the same traces: the averaged gradient is the one-process one
        results.append(
            {"loss": loss, "grads": {n: p.grad.full_tensor().float() for n, p in model.named_parameters()}}
        )
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_policies_are_built_from_plain_values():
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    assert fsdp_kwargs(False, None, on_cuda=True) == {}
    assert fsdp_kwargs(False, torch.float32, on_cuda=True) == {}
    kw = fsdp_kwargs(True, torch.bfloat16, on_cuda=True)
    assert kw["mp_policy"] == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert isinstance(kw["offload_policy"], CPUOffloadPolicy) and kw["offload_policy"].pin_memory


def test_decoder_layers_are_the_models_own_block_class():
    """What FSDP2 wraps one by one: the class each model names in `_no_split_modules`, wherever its
    layers live (`model.layers`, GPT-2's `transformer.h`), also inside a PeftModel; none for a model that
    names no block class (then only the root is sharded)."""
    from peft import LoraConfig, get_peft_model

    from sm_dist.learner.lora import hf_model

    want = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "gpt2": "GPT2Block"}
    for arch, model in tiny_models(vocab=V, hidden=32).items():
        layers = decoder_layers(model)
        assert [type(m).__name__ for m in layers] == [want[arch]] * 2, arch
        peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        assert decoder_layers(hf_model(peft)) == layers, arch  # the same blocks, now holding adapters
    assert decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def _worst(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


def test_activation_checkpointing_keeps_the_gradients():
    """Each layer's forward runs again in backward, under the masked attention it ran with first
    (split attention, packed rows): the gradients are the plain step's."""
    model = _model().train()
    ref_loss = _step(model)
    ref = {n: p.grad for n, p in model.named_parameters()}
    model = _model().train()
    enable_activation_checkpointing(model)
    assert _step(model) == pytest.approx(ref_loss, rel=1e-6)
    assert _worst({n: p.grad for n, p in model.named_parameters()}, ref) <= 1e-5


def test_fsdp2_offload_and_mixed_precision_steps_match_one_process(tmp_path):
    """Two gloo ranks, activation checkpointing on: with CPUOffloadPolicy the gradients equal one
    unsharded process's (fp32 <= 1e-5); with MixedPrecisionPolicy (bf16 parameters, fp32 reduction)
    they agree to bf16 precision."""

    model = _model()
    ref_loss = _step(model)
    ref = {n: p.grad for n, p in model.named_parameters()}
    out = str(tmp_path / "rank0.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    for (offload, bf16, tol), got in zip(CASES, torch.load(out)):
        assert abs(got["loss"] - ref_loss) <= tol * abs(ref_loss)
        worst = _worst(got["grads"], ref)
        assert worst <= tol, f"worst relative gradient diff {worst:.2e} (offload={offload}, bf16={bf16})"
