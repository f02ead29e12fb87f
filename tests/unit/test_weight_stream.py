"""Weights leave the learner as a stream (sm_dist.sync.stream): under FSDP2 on two gloo ranks (plain
torch.multiprocessing, no Ray) rank 0 builds the wire buffer while rank 1 drains, one all-gather per
tensor; the buffer equals the unsharded model's weights in bf16 (LoRA: the merged weights), and no read
held more than the largest single tensor. A tied head travels once."""

import os
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

from sm_dist.learner import lora
from sm_dist.learner.sharded import decoder_layers, fully_shard_model
from sm_dist.sync.object_store import safetensors_views, state_dict_to_buffer
from sm_dist.sync.stream import drain, from_state_dict

V, BK = 32, 31
LORA = SimpleNamespace(
    r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], bkspc_rows="trainable_tokens"
)


def _model(use_lora: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if not use_lora:
        return model
    model = lora.apply_lora(model, LORA, BK)
    with torch.no_grad():  # adapters that change the weights (PEFT starts B at zero), the same on every rank
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    return model


def _stream(model, use_lora: bool):
    if use_lora:
        return lora.merged_stream(model, lora.live_state_dict(model), torch.bfloat16)
    return from_state_dict(model.state_dict(), torch.bfloat16)


def _rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    # a file store: no port to choose and lose to another process before rank 0 binds it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for use_lora in (False, True):
        model = _model(use_lora)
        fully_shard_model(model, decoder_layers(lora.hf_model(model)))
        stream = _stream(model, use_lora)
        if rank == 0:
            buf = state_dict_to_buffer(stream)
            results[use_lora] = {"buf": bytes(buf), "largest": stream.largest_read_bytes}
        else:
            drain(stream)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_fsdp2_ranks_stream_the_weights_one_tensor_at_a_time(tmp_path):

    out = str(tmp_path / "rank0.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    got = torch.load(out)
    for use_lora in (False, True):
        model = _model(use_lora)
        if use_lora:
            ref = lora.merged_state_dict(model, model.state_dict(), torch.bfloat16)
        else:
            ref = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        sent = safetensors_views(got[use_lora]["buf"])
        assert set(sent) == set(ref), set(sent) ^ set(ref)
        for k, v in ref.items():
            assert sent[k].dtype == torch.bfloat16
            assert torch.equal(sent[k], v), k
        largest = max(p.numel() * 4 for p in model.state_dict().values())  # one fp32 tensor, gathered
        total = sum(p.numel() * 4 for p in model.state_dict().values())
        assert 0 < got[use_lora]["largest"] <= largest < total / 4


def test_a_tied_head_travels_once_and_the_buffer_is_in_the_wire_dtype():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    sd = model.state_dict()
    stream = from_state_dict(sd, torch.bfloat16)
    names = [s.name for s in stream.specs]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    sent = safetensors_views(state_dict_to_buffer(stream))
    assert set(sent) == set(names)
    assert all(t.dtype == torch.bfloat16 for k, t in sent.items() if sd[k].is_floating_point())
    assert torch.equal(sent["transformer.wte.weight"], sd["lm_head.weight"].to(torch.bfloat16))
    assert stream.nbytes == sum(t.numel() * t.element_size() for t in sent.values())


def _learner_rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    from sm_dist.config import LearnerConfig, ObjectiveConfig
    from sm_dist.learner.learner import Learner

    lr = Learner(rank, world, model_dir, LearnerConfig(strategy="fsdp2"), ObjectiveConfig(), 10)
    before = {p.device.type for p in lr.module.parameters()}
    lr.join("127.0.0.1", port)
    after = {p.device.type for p in lr.module.parameters()}
    sd = lr._full_state_dict()  # every rank takes part; rank 0 gets the whole model
    torch.save({"before": before, "after": after, "sd": sd}, f"{out}.{rank}")


def test_fsdp2_ranks_build_on_meta_and_get_rank0s_weights(tiny_model_dir, tmp_path):
    """Rank 1 builds its model on the meta device (no weights read, no memory); after sharding it holds
    real shards of rank 0's weights: the gathered model equals the folder's."""
    from transformers import AutoModelForCausalLM

    from sm_dist.orchestrator.cluster import free_port

    out = str(tmp_path / "rank")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_learner_rank, args=(2, free_port("127.0.0.1"), str(tiny_model_dir), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["before"] == {"cpu"} and r1["before"] == {"meta"}
    assert r0["after"] == r1["after"] == {"cpu"}
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert r1["sd"] == {} and set(r0["sd"]) <= set(ref)
    for k, v in r0["sd"].items():
        assert torch.equal(v, ref[k]), k
