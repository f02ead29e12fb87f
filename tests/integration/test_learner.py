"""The learner rank: 2 gloo ranks with B/2 rows each (DDP, and FSDP2 with sharded parameters and
optimiser state) take the same steps as 1 rank with B rows; checkpoints round-trip (also sharded);
the NaN guard skips and then stops."""

from __future__ import annotations

import pytest
import torch

from sm_dist.config import LearnerConfig, ObjectiveConfig
from sm_dist.learner.calls import local_param_numel, rendezvous_address

LEARNER = LearnerConfig(lr=1e-3, lr_warmup_steps=0, schedule="constant", clip_norm=1.0, grad_accum=1)
OBJECTIVE = ObjectiveConfig(
    divergence={"kind": "chi2_mixture", "chi2_weight": 1e-3}, warmup_steps=0, sm_lambda=0.5
)


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    """8 augmented data rows and 8 'model' rows (with backspaces and a truncated one)."""
    from transformers import AutoTokenizer

    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.data.arith import generate
    from sm_dist.data.datasets import Example, augment, encode_examples, make_data_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bk = get_bkspc_id(tok)
    ex = [Example(e["prompt"], e["answer"]) for e in generate(16, "easy", seed=3)]
    enc, _ = encode_examples(ex, tok, 64, 32, "skip")
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    data = make_data_rows(augment(enc[:8], bk, 0.3, digits, seed=0), bk, id_prefix="d")
    model = []
    for i, e in enumerate(enc[8:16]):
        acts = [*e.target_ids[:1], digits[i % 10], bk, *e.target_ids[1:]]
        if i % 3 == 0:
            acts = acts[:-1]  # truncated rollout (no eos)
        model.append(
            {
                **data[0],
                "sample_id": f"m{i}",
                "prompt_ids": e.prompt_ids,
                "action_ids": acts,
                "source": "model",
                "policy_version": 0,
                "is_noise": [],
            }
        )
    return data, model


def _group(L, n: int, model_dir, cfg) -> list:
    """`n` ranks of actor class `L` in one process group, met at rank 0's own address."""
    import ray

    ranks = [L.remote(r, n, str(model_dir), cfg, OBJECTIVE, 10, seed=0) for r in range(n)]
    addr, port = ray.get(ranks[0].__ray_call__.remote(rendezvous_address))
    ray.get([lr.join.remote(addr, port) for lr in ranks])
    return ranks


def _params_after(learners, shards, steps: int = 1) -> dict[str, torch.Tensor]:
    import ray

    for _ in range(steps):
        ray.get([lr.train_step.remote(d, m) for lr, (d, m) in zip(learners, shards)])
    return ray.get([lr._full_state_dict.remote() for lr in learners])[0]  # a collective under FSDP2


@pytest.mark.parametrize("strategy, steps", [("ddp", 1), ("fsdp2", 2)])
def test_two_gloo_ranks_equal_one_rank(ray_cluster, tiny_model_dir, rows, strategy, steps):
    """FSDP2 takes two steps, so the second one runs AdamW on sharded, non-empty moment estimates."""
    ray = ray_cluster
    from sm_dist.learner.learner import Learner

    data, model = rows
    L = ray.remote(num_cpus=1)(Learner)
    one = L.remote(0, 1, str(tiny_model_dir), LEARNER, OBJECTIVE, 10, seed=0)
    p1 = _params_after([one], [(data, model)], steps)
    ray.kill(one)

    cfg = LEARNER.model_copy(update={"strategy": strategy})
    two = _group(L, 2, tiny_model_dir, cfg)
    if strategy == "fsdp2":  # really sharded: each rank holds about half of every parameter
        local = ray.get(two[1].__ray_call__.remote(local_param_numel))
        total = sum(v.numel() for v in p1.values())
        assert local < 0.6 * total, f"rank 1 holds {local} of {total} parameters: not sharded"
    # even split by source: every rank holds 4 data + 4 model rows
    p2 = _params_after(two, [(data[r::2], model[r::2]) for r in (0, 1)], steps)
    for lr in two:
        ray.kill(lr)

    from safetensors.torch import load_file

    p0 = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = max(float((p1[k] - p0[k]).abs().max()) for k in p1)
    assert moved > 1e-4, "the step did not change the parameters"
    worst = max(float((p1[k] - p2[k]).abs().max()) for k in p1)
    assert worst <= 1e-5, f"2-rank {strategy} step differs from the 1-rank step by {worst}"


def test_fsdp2_checkpoint_resumes_the_same_steps(ray_cluster, tmp_path, tiny_model_dir, rows):
    """Sharded checkpoints (each rank its own DCP shard, no gather of the optimiser state): 2 FSDP2
    ranks step, checkpoint, step again; a fresh pair that loads the checkpoint takes the same step to
    the same weights. The same checkpoint loads onto 1 rank (the DDP path) taking the whole batch, and
    that rank's checkpoint loads back onto the 2 FSDP2 ranks: the steps agree across the change of
    strategy and rank count (to the 1-vs-2-rank tolerance of the equivalence test)."""
    ray = ray_cluster
    from sm_dist.learner.learner import Learner

    data, model = rows
    L = ray.remote(num_cpus=1)(Learner)
    cfg = LEARNER.model_copy(update={"strategy": "fsdp2"})
    shards = [(data[r::2], model[r::2]) for r in (0, 1)]

    a = _group(L, 2, tiny_model_dir, cfg)
    _params_after(a, shards)
    figures = ray.get([lr.save.remote(str(tmp_path / "ck")) for lr in a])
    pa = _params_after(a, shards)
    for lr in a:
        ray.kill(lr)
    state = tmp_path / "ck" / "state"
    assert sorted(f.name for f in state.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (tmp_path / "ck" / "optimizer.pt").exists()
    print(f"FSDP2 save per rank: {[(f['state_bytes'], round(f['state_s'], 3)) for f in figures]}")

    b = _group(L, 2, tiny_model_dir, cfg)
    assert ray.get([lr.load.remote(str(tmp_path / "ck")) for lr in b]) == [1, 1]
    pb = _params_after(b, shards)
    _close(pa, pb, 1e-6, "resumed FSDP2 step vs the uninterrupted one")

    one = L.remote(0, 1, str(tiny_model_dir), LEARNER, OBJECTIVE, 10, seed=0)  # 2 FSDP2 ranks -> 1 rank
    assert ray.get(one.load.remote(str(tmp_path / "ck"))) == 1
    _close(pa, _params_after([one], [(data, model)]), 1e-5, "1 rank from the FSDP2 checkpoint")
    ray.get(one.save.remote(str(tmp_path / "ck1")))
    p_one = _params_after([one], [(data, model)])
    ray.kill(one)
    assert ray.get([lr.load.remote(str(tmp_path / "ck1")) for lr in b]) == [2, 2]  # 1 -> 2 FSDP2
    _close(p_one, _params_after(b, shards), 1e-5, "2 FSDP2 ranks from the 1-rank checkpoint")
    for lr in b:
        ray.kill(lr)


def _close(p, q, tol: float, what: str) -> None:
    worst = max(float((p[k] - q[k]).abs().max()) for k in p)
    assert worst <= tol, f"{what}: differs by {worst}"


def test_checkpoint_roundtrip_and_nan_guard(tmp_path, tiny_model_dir, rows):
    from sm_dist.learner.learner import Learner

    data, model = rows
    a = Learner(0, 1, str(tiny_model_dir), LEARNER.model_copy(update={"grad_accum": 2}), OBJECTIVE, 10)
    a.train_step(data[:4], model[:4])
    a.save(str(tmp_path / "ck"))
    m_a = a.train_step(data[4:], model[4:])

    b = Learner(0, 1, str(tiny_model_dir), LEARNER.model_copy(update={"grad_accum": 2}), OBJECTIVE, 10)
    assert b.load(str(tmp_path / "ck")) == 1
    m_b = b.train_step(data[4:], model[4:])
    assert m_b["learner/step"] == 2
    assert abs(m_a["loss/total"] - m_b["loss/total"]) < 1e-6
    for (k, pa), pb in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), k

    # NaN guard: poison a weight -> steps are skipped (parameters untouched), then the rank stops
    with torch.no_grad():
        b.module.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    before = b.module.lm_head.weight.detach().clone()
    m = b.train_step(data[:2], model[:2])
    assert m["learner/skipped_total"] == 1
    assert torch.equal(before, b.module.lm_head.weight)
    b.train_step(data[:2], model[:2])
    with pytest.raises(FloatingPointError, match="nan_tolerance"):
        b.train_step(data[:2], model[:2])


def test_data_rows_use_their_stored_noise_flags(tiny_model_dir, rows):
    """is_noise travels in the Arrow schema: a data row's own flags decide what is not imitated (a
    genuine expert correction, a token then <bkspc>, stays imitated); a row without flags has no noise
    (schema v3: nothing is inferred from the actions)."""
    from sm_dist.learner.learner import Learner
    from sm_dist.learner.step import to_traces

    data, _ = rows
    row = next(r for r in data if any(r["is_noise"]))
    lr = Learner(0, 1, str(tiny_model_dir), LEARNER, OBJECTIVE, 10)
    stored, genuine, none = to_traces(
        [row, {**row, "is_noise": [False] * len(row["action_ids"])}, {**row, "is_noise": []}],
        lr.bkspc_id, lr.eos_id, lr.vocab_size,
    )  # fmt: skip
    assert stored.is_noise.tolist() == row["is_noise"]
    assert not genuine.is_noise.any() and not none.is_noise.any()
