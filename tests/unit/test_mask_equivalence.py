"""The mandatory equivalence test (DESIGN §2): one masked pass == separate passes per collapsed state.

For >= 200 random traces per model (random lengths, backspace rates 0-50 %, backspaces at the prompt
boundary, runs of consecutive backspaces), for Llama, Qwen2 and GPT-2 tiny models, through both the
dense SDPA mask and the FlexAttention BlockMask: fp32 max abs diff <= 1e-5.
"""

import pytest
import torch

from sm_dist.core.forward import forward_traces
from sm_dist.core.traces import build_inputs, collate

from .equivalence import grad_rel_diff, max_state_diff, random_traces, tiny_models

V, BK = 48, 47
N_TRACES = 200


@pytest.fixture(scope="module")
def models():
    return tiny_models(V, hidden=64)


@pytest.fixture(scope="module")
def ref_cache():
    """Reference logits per (arch, collapsed state), shared by the SDPA and FlexAttention runs."""
    return {"llama": {}, "qwen2": {}, "gpt2": {}}


@pytest.mark.parametrize("attn", ["sdpa", "flex", "split"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@torch.no_grad()
def test_single_pass_equals_separate_passes(models, ref_cache, arch, attn):
    traces = random_traces(N_TRACES, seed=sum(map(ord, arch)), bkspc=BK)
    assert sum(BK in a for _, a in traces) > N_TRACES // 2
    worst, _, checked = max_state_diff(models[arch], traces, BK, attn, cache=ref_cache[arch])
    assert checked > 2000
    assert worst <= 1e-5, f"{arch}/{attn}: max abs diff {worst:.2e} over {checked} states"


@pytest.mark.parametrize("attn", ["sdpa", "flex", "split"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_packed_single_pass_equals_separate_passes(models, ref_cache, arch, attn):
    """Several traces a row (positions restart, no attention across segments, the <bkspc> rule inside
    each): every state's logits still equal its separate pass, through all three backends."""
    traces = random_traces(120, seed=sum(map(ord, arch)), bkspc=BK)
    batch = collate([build_inputs(p, a, BK) for p, a in traces[:50]], pack=True)
    assert batch.input_ids.shape[0] <= 40  # the packing is real: 38 rows for 50 traces here
    worst, _, checked = max_state_diff(models[arch], traces, BK, attn, cache=ref_cache[arch], pack=True)
    assert checked > 1000
    assert worst <= 1e-5, f"{arch}/{attn} packed: max abs diff {worst:.2e} over {checked} states"


@torch.no_grad()
def test_packed_rows_without_backspace_do_not_see_each_other(models):
    """No <bkspc> anywhere: the plain causal path would let a packed trace attend to the one before it;
    the packed batch takes the segment mask instead."""
    a, b = build_inputs([1, 2, 3], [4, 5], BK), build_inputs([6, 7], [8, 9, 10], BK)
    (la, lb) = forward_traces(models["llama"], [a, b], attn="sdpa", pack=True)
    ref_b = models["llama"](torch.tensor([[6, 7, 8, 9, 10]])).logits[0].float()
    assert torch.allclose(lb, ref_b, atol=1e-5)


@torch.no_grad()
def test_plain_causal_path_matches_hf(models):
    model = models["llama"]
    tr = build_inputs([1, 2, 3], [4, 5, 6], BK)
    (logits,) = forward_traces(model, [tr])
    ref = model(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits[0].float()
    assert torch.allclose(logits, ref, atol=1e-6)


def test_out_of_vocab_is_named(models):
    tr = build_inputs([1, 2], [3, V + 5], BK)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        forward_traces(models["llama"], [tr])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_split_parameter_gradients_match_the_dense_mask(models, arch):
    """The learner differentiates through the masked pass: the parameter gradients of a loss over the
    logits of a ragged batch (GQA for Llama) agree with the dense-mask path's. `split` runs the model
    on permuted inputs and un-permutes before the LM head, so this checks that permutation's backward.
    (FlexAttention has no backward on the CPU; benchmarks/gpu_equivalence.py checks it on a GPU.)"""
    worst, n = grad_rel_diff(models[arch], random_traces(12, seed=7, bkspc=BK), BK, "split")
    assert n > 10 and worst <= 1e-4, f"{arch}: worst relative gradient diff {worst:.2e}"


def test_flex_training_on_cpu_is_refused_with_the_fix(models):
    tr = build_inputs([1, 2], [3, BK, 4], BK)
    with pytest.raises(ValueError, match="attn='split'"):
        forward_traces(models["llama"], [tr], attn="flex")
