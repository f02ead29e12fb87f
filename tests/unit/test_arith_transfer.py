"""benchmarks/arith_transfer.py: disjoint splits in bases 11-16, and every arm takes the same expert rows
per learner step (the rest is the benchmark's own run: `--regime transfer`)."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
arith_transfer = pytest.importorskip("arith_transfer")


def _args(**kw):
    import arith_sm_vs_mle

    a = arith_sm_vs_mle.parse_args(["--regime", "transfer"])
    return Namespace(**{**vars(a), **kw})


def test_splits_are_disjoint_and_in_bases_11_to_16(tmp_path):
    from sm_dist.data.arith import parse_question

    a = _args(n_val=40, n_test=60, ft_examples=100)
    paths = arith_transfer.make_splits(tmp_path, a)
    prompts = {k: [json.loads(x)["prompt"] for x in p.read_text().splitlines()] for k, p in paths.items()}
    assert [len(prompts[k]) for k in ("val", "test", "ft_train")] == [40, 60, 100]
    allp = [q for v in prompts.values() for q in v]
    assert len(set(allp)) == len(allp)
    assert {parse_question(q)[0] for q in allp} <= arith_transfer.FINETUNE_BASES


def _kv(over):
    return dict(o.split("=", 1) for o in over)


@pytest.mark.parametrize("arm", list(arith_transfer.ARMS))
def test_every_arm_takes_the_same_expert_rows_per_step(arm):
    a = _args()
    o = _kv(arith_transfer.arm_overrides(arm, {"p_noise": 0.25, "chi2_weight": 0.01}, a, Path("n.jsonl")))
    data_rows = int(o["learner.batch_size"]) * (1 - float(o["buffer.replay_fraction"]))
    assert data_rows == pytest.approx(a.data_rows)
    assert o["run.eval_path"] == "null"
    noise = {"mle": None, "bc_plausible": "plausible", "sm_plausible": "plausible", "bc_uniform": "task",
             "sm_uniform": "task", "sm_model_noise": "model"}[arm]  # fmt: skip
    assert o.get("data.noise.kind") == noise
    assert float(o["data.p_noise"]) == (0.0 if arm == "mle" else 0.25)
    if arm.startswith("sm"):
        assert (
            o["objective.divergence.kind"] == "chi2_mixture"
            and float(o["objective.divergence.chi2_weight"]) == 0.01
        )
        assert o["buffer.fill_with_data"] == "false"
    else:
        assert o["objective.divergence.kind"] == "mle"
