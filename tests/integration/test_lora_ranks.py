"""LoRA on 2 gloo learner ranks: DDP and FSDP2 (sharded adapters) take the same steps as 1 rank with the
whole batch; the merged weights they publish (gathered under FSDP2) agree, and an FSDP2 checkpoint of the
adapter resumes on 1 rank."""

from __future__ import annotations

import pytest
import torch

from sm_dist.config import LoraSettings, ModelConfig
from tests.integration.test_learner import LEARNER, OBJECTIVE, rows  # noqa: F401 -- the fixture

LORA = ModelConfig(lora=LoraSettings(r=8, alpha=16))


def _ranks(ray, L, n: int, model_dir, cfg) -> list:
    ranks = [L.remote(r, n, str(model_dir), cfg, OBJECTIVE, 10, seed=0, model=LORA) for r in range(n)]
    addr, port = ray.get(ranks[0].rendezvous_address.remote())
    ray.get([lr.init_distributed.remote(addr, port) for lr in ranks])
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
        ray.get([lr.save_checkpoint.remote(str(tmp_path)) for lr in two])
    for lr in two:
        ray.kill(lr)
    if strategy == "fsdp2":
        fresh = _ranks(ray, L, 1, tiny_model_dir, LEARNER)
        ray.get(fresh[0].load_checkpoint.remote(str(tmp_path)))
        back = ray.get(fresh[0]._sync_state_dict.remote())
        assert max(float((back[k] - p2[k]).abs().max()) for k in p2) == 0.0
        ray.kill(fresh[0])
