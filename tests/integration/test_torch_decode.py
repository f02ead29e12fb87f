"""The pure-torch decoder (sm_dist.eval.torch_decode, for machines without vLLM) against `sm-dist eval`'s
vLLM path on a tiny model: the same actions, predictions and finish reasons under search decoding
(with a <bkspc> bias so that backspaces, bans and the cap all occur), also from forced prefixes."""

import json

import pytest

pytestmark = pytest.mark.slow


def _key(r):
    return (r["prediction"], r["num_actions"], r["num_backspaces"], r["finish_reason"], r["bkspc_fixes"])


@pytest.mark.parametrize("force", [None, "plausible"])
def test_torch_search_equals_vllm_search(tiny_model_dir, tmp_path, force):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sm_dist.data.arith import generate
    from sm_dist.data.datasets import Example
    from sm_dist.eval.arith_eval import evaluate
    from sm_dist.eval.torch_decode import evaluate_torch

    qs = generate(40, "easy", 11)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in qs))
    kw = {"max_actions": 12, "max_backspaces": 3, "bkspc_bias": 4.0}
    if force:
        kw |= {"force_error": True, "force_error_kind": force}
    ref = evaluate(tiny_model_dir, data, decoding="search", progress=False, **kw)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    got = evaluate_torch(model, tok, [Example(q["prompt"], q["answer"]) for q in qs], "search", **kw)
    assert ref["num_backspaces"] > 5 and ref["bkspc_cap_hits"] + ref["length_cap_hits"] > 0
    assert [_key(r) for r in got["examples"]] == [_key(r) for r in ref["examples"]]
    for k in ("accuracy", "bkspc_precision", "repeat_cycles", "write_delete_pairs", "bkspc_cap_hits"):
        assert got[k] == ref[k], k
