"""The chunked loss from hidden states (sm_dist.core.head_loss) and sequence packing, against today's
full-logits path: the same loss and the same parameter gradients (fp32 <= 1e-5), for every divergence,
packed or not, and the MLE baseline's chunked cross-entropy against HF's."""

import pytest
import torch

from sm_dist.core.forward import masked_logits, masked_scores
from sm_dist.core.head_loss import HeadTargets, chunked_head_scores
from sm_dist.core.objective import DIVERGENCES, ObjectiveParams, sequence_match_loss
from sm_dist.core.traces import build_inputs, collate
from sm_dist.learner.step import StepParams, loss_and_backward, mle_loss_and_backward

from .equivalence import random_traces, tiny_models
from .test_objective import BK, EOS, V, _traces


@pytest.fixture(scope="module")
def models():
    return tiny_models(V, hidden=32)


def _grads(model) -> dict[str, torch.Tensor]:
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def _worst_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 10
    return max(((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-12)).item() for n in a)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_scores_and_gradients_equal_full_logits(chunk):
    """lse (with the excluded column left out where asked) and the chosen logit, and their gradients
    with respect to h, W and the bias, equal those of logsumexp / gather over the full logits."""
    torch.manual_seed(0)
    S, H, Vb = 50, 16, 40
    head = torch.nn.Linear(H, Vb, bias=True)
    h = torch.randn(S, H, requires_grad=True)
    t = HeadTargets(torch.arange(S), torch.randint(0, Vb, (S,)), torch.rand(S) < 0.3, excluded_id=Vb - 1)
    g_lse, g_q = torch.randn(S), torch.randn(S)
    lse, q = chunked_head_scores(h, head, t, chunk)
    (lse * g_lse + q * g_q).sum().backward()
    got = [lse.detach(), q.detach(), h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    h.grad = head.weight.grad = head.bias.grad = None
    logits = head(h)
    q_ref = logits.gather(1, t.actions[:, None])[:, 0]
    lse_ref = torch.logsumexp(
        logits.masked_fill(t.exclude[:, None] & (torch.arange(Vb) == Vb - 1), -torch.inf), -1
    )
    (lse_ref * g_lse + q_ref * g_q).sum().backward()
    ref = [lse_ref.detach(), q_ref.detach(), h.grad, head.weight.grad, head.bias.grad]
    for name, a, b in zip(["lse", "q", "dh", "dW", "db"], got, ref):
        assert (a - b).abs().max() <= 1e-5, f"{name}: {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("pack", [False, True])
def test_objective_from_chunked_scores_equals_full_logits(models, div, pack):
    """The objective (data + model rows, noise, truncation, boundary <bkspc>) over `masked_scores`
    (head on the states only, chunks of 5) equals it over `masked_logits`: loss and every parameter
    gradient, fp32 <= 1e-5 (relative for gradients); the chunked side may also be packed."""
    model = models["llama"]
    traces = _traces(seed=3, n=16)
    p = ObjectiveParams(bkspc_id=BK, divergence=div, chi2_weight=0.05)
    ref_batch = collate(traces)
    l_ref, _ = sequence_match_loss(masked_logits(model, ref_batch, "sdpa"), ref_batch, p)
    l_ref.backward()
    g_ref = _grads(model)
    batch = collate(traces, pack=pack)
    assert batch.input_ids.shape[0] < 16 if pack else batch.input_ids.shape[0] == 16
    l_got, _ = sequence_match_loss(masked_scores(model, batch, BK, "split", chunk=5), batch, p)
    l_got.backward()
    lg, lr = float(l_got.detach()), float(l_ref.detach())
    assert abs(lg - lr) <= 1e-5 * max(1.0, abs(lr))
    assert _worst_rel(g_ref, _grads(model)) <= 1e-5


def test_learner_step_packed_chunked_equals_padded_full_logits(models):
    """`loss_and_backward` with pack + chunked loss (the defaults' path) against padded + full logits,
    on GPT-2 (tied head and embeddings: both gradients land on one parameter)."""
    model = models["gpt2"]  # eval mode: GPT-2 has dropout
    traces = [build_inputs(pr, a, BK, eos_id=None, from_data=i % 2 == 0) for i, (pr, a) in
              enumerate(random_traces(24, seed=5, bkspc=BK, max_steps=20))]  # fmt: skip
    obj = ObjectiveParams(bkspc_id=BK)
    m_ref = loss_and_backward(model, traces, StepParams(obj, attn="sdpa", loss_chunk_size=0), step=0)
    g_ref = _grads(model)
    m = loss_and_backward(model, traces, StepParams(obj, attn="split", loss_chunk_size=16, pack=True), step=0)
    assert abs(m["loss/total"] - m_ref["loss/total"]) <= 1e-5 * max(1.0, abs(m_ref["loss/total"]))
    assert _worst_rel(g_ref, _grads(model)) <= 1e-5
    assert m["perf/tokens"] == m_ref["perf/tokens"] and m["perf/rows"] < m_ref["perf/rows"]


def test_mle_baseline_chunked_equals_full(models):
    model = models["qwen2"]
    ids = torch.randint(0, V, (3, 17))
    l_full = mle_loss_and_backward(model, ids, gamma=0.99)
    g_full = _grads(model)
    l_chunk = mle_loss_and_backward(model, ids, gamma=0.99, chunk=6)
    assert abs(l_chunk - l_full) <= 1e-5
    assert _worst_rel(g_full, _grads(model)) <= 1e-5


def test_bf16_autocast_chunked_is_close_to_full(models):
    """Under bf16 autocast the head runs in bf16 in both paths (fp32 logsumexp): ~1e-2 relative."""
    model = models["llama"]
    batch = collate(_traces(seed=4, n=8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = masked_logits(model, batch, "sdpa")
        sc = masked_scores(model, batch, BK, "sdpa", chunk=4)
    p = ObjectiveParams(bkspc_id=BK)
    l_full, _ = sequence_match_loss(full, batch, p)
    l_chunk, _ = sequence_match_loss(sc, batch, p)
    assert abs(float(l_chunk) - float(l_full)) <= 2e-2 * abs(float(l_full))


def test_post_processed_logits_are_refused_with_the_fix(models):
    model = models["llama"]
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(ValueError, match="loss_chunk_size=0"):
            masked_scores(model, collate([build_inputs([1, 2], [3, BK, EOS], BK, eos_id=EOS)]), BK)
    finally:
        model.config.final_logit_softcapping = None


def test_a_peft_wrapped_head_falls_back_to_full_logits():
    """Under LoRA the <bkspc> head row trains as a PEFT trainable-token delta inside the head's wrapper:
    the chunked path (which reads head.weight) would miss it, so the step takes the full logits, and the
    delta gets its gradient."""
    from peft import LoraConfig, get_peft_model

    from sm_dist.core.head_loss import plain_head

    model = tiny_models(V, hidden=32)["llama"]
    assert plain_head(model) is model.lm_head
    peft = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"lm_head": [BK]})
    )
    assert plain_head(peft) is None
    m = loss_and_backward(peft, _traces(seed=2, n=6), StepParams(ObjectiveParams(bkspc_id=BK)), step=0)
    assert m["loss/total"] == m["loss/total"]  # finite, no error
    deltas = [p for n, p in peft.named_parameters() if "lm_head" in n and "trainable_tokens_delta" in n]
    assert deltas and all(d.grad is not None and d.grad.abs().sum() > 0 for d in deltas)
