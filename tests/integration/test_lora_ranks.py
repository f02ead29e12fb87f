"""LoRA on 2 gloo learner ranks: DDP and FSDP2 (sharded adapters) take the same steps as 1 rank with the
whole batch; the merged weights they publish (gathered under FSDP2) agree, and an FSDP2 checkpoint of the
adapter resumes on 1 rank. Other architectures: a tiny Qwen2 and a tiny GPT-2 (tied head, Conv1D
layers) on 2 FSDP2 ranks, each decoder block its own FSDP2 group, equal 1 rank with and without LoRA."""

from __future__ import annotations

import pytest
import torch

from sm_dist.config import LoraSettings, ModelConfig
from sm_dist.learner.calls import local_param_numel, rendezvous_address
from tests.integration.test_learner import LEARNER, OBJECTIVE, rows  # noqa: F401 -- the fixture

LORA = ModelConfig(lora=LoraSettings(r=8, alpha=16))


def _ranks(ray, L, n: int, model_dir, cfg, model: ModelConfig = LORA) -> list:
    ranks = [L.remote(r, n, str(model_dir), cfg, OBJECTIVE, 10, seed=0, model=model) for r in range(n)]
    addr, port = ray.get(ranks[0].__ray_call__.remote(rendezvous_address))
    ray.get([lr.join.remote(addr, port) for lr in ranks])
    return ranks


def _merged_after(ray, ranks, shards, steps: int = 2) -> dict[str, torch.Tensor]:
    for _ in range(steps):
        ray.get([lr.train_step.remote(d, m) for lr, (d, m) in zip(ranks, shards)])
    return ray.get([lr._sync_state_dict.remote() for lr in ranks])[0]  # a collective under FSDP2


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lora_two_gloo_ranks_equal_one_rank(ray_cluster, tiny_model_dir, rows, strategy, tmp_path):  # noqa: F811
    ray = ray_cluster
    from sm_dist.learner.learner import Learner

    data, model = rows
    L = ray.remote(num_cpus=1)(Learner)
    one = _ranks(ray, L, 1, tiny_model_dir, LEARNER)
    p1 = _merged_after(ray, one, [(data, model)])
    ray.kill(one[0])  # the cluster has CPUs for two learner actors at a time
    two = _ranks(ray, L, 2, tiny_model_dir, LEARNER.model_copy(update={"strategy": strategy}))
    p2 = _merged_after(ray, two, [(data[r::2], model[r::2]) for r in (0, 1)])
    worst = max(float((p1[k] - p2[k]).abs().max()) for k in p1)
    assert worst <= 1e-5, f"2-rank LoRA {strategy} differs from 1 rank by {worst}"
    if strategy == "fsdp2":  # the adapter checkpoint written by 2 sharded ranks resumes on one
        ray.get([lr.save.remote(str(tmp_path)) for lr in two])
    for lr in two:
        ray.kill(lr)
    if strategy == "fsdp2":
        fresh = _ranks(ray, L, 1, tiny_model_dir, LEARNER)
        ray.get(fresh[0].load.remote(str(tmp_path)))
        back = ray.get(fresh[0]._sync_state_dict.remote())
        assert max(float((back[k] - p2[k]).abs().max()) for k in p2) == 0.0
        ray.kill(fresh[0])


@pytest.fixture(scope="module")
def arch_dirs(tiny_model_dir, tmp_path_factory) -> dict:
    """A tiny Qwen2 and a tiny GPT-2 with the tiny Llama's tokenizer (<bkspc> included), so the
    `rows` fixture's ids fit them; no dropout (GPT-2's 0.1 would draw other masks on each rank)."""
    from transformers import AutoTokenizer

    from tests.archs import ARCHS, build_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    root = tmp_path_factory.mktemp("archs")
    return {a: build_model(a, tok, root / a, dropout=0.0) for a in ARCHS}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_fsdp2_two_gloo_ranks_equal_one_rank_qwen2_gpt2(ray_cluster, arch_dirs, rows, arch, lora):  # noqa: F811
    """Two steps (the second on non-empty AdamW moments); the 1-rank reference runs in this process.
    The weights compared are the ones a sync publishes (LoRA: merged), gathered from the shards."""
    ray = ray_cluster
    from safetensors.torch import load_file

    from sm_dist.learner.learner import Learner

    data, model = rows
    mcfg = LORA if lora else ModelConfig()
    one = Learner(0, 1, str(arch_dirs[arch]), LEARNER, OBJECTIVE, 10, seed=0, device="cpu", model=mcfg)
    for _ in range(2):
        one.train_step(data, model)
    p1 = {k: v.detach().clone() for k, v in one._sync_state_dict().items()}
    del one
    L = ray.remote(num_cpus=1)(Learner)
    two = _ranks(ray, L, 2, arch_dirs[arch], LEARNER.model_copy(update={"strategy": "fsdp2"}), mcfg)
    total = sum(v.numel() for k, v in p1.items() if k != "lm_head.weight" or arch != "gpt2")  # tied: once
    local = ray.get(two[1].__ray_call__.remote(local_param_numel))
    p2 = _merged_after(ray, two, [(data[r::2], model[r::2]) for r in (0, 1)])
    for lr in two:
        ray.kill(lr)
    assert local < 0.6 * total, f"rank 1 holds {local} of {total} parameter elements: not sharded"
    p0 = load_file(str(arch_dirs[arch] / "model.safetensors"))
    moved = max(float((p1[k] - p0[k]).abs().max()) for k in p0)
    assert moved > 1e-4, "the steps did not change the weights"
    assert set(p0) <= set(p1) and set(p0) <= set(p2), (sorted(p0), sorted(p1), sorted(p2))
    worst = max(float((p1[k] - p2[k]).abs().max()) for k in p0)
    assert worst <= 1e-5, f"2-rank FSDP2 {arch} ({'LoRA' if lora else 'full'}) differs from 1 rank by {worst}"
