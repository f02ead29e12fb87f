"""The loop remedies of the objective (objective.truncated_value, objective.bkspc_discount): what each
changes in the loss, exactly, and that the chunked path (head_loss) computes the same loss with them."""

import pytest
import torch

from sm_dist.core.forward import masked_logits, masked_scores
from sm_dist.core.objective import ObjectiveParams, sequence_match_loss, state_values
from sm_dist.core.traces import collate

from .equivalence import tiny_models
from .test_objective import BK, V, _traces


def _logits(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, N = batch.input_ids.shape
    return torch.randn(R, N, V, generator=g, dtype=torch.float64)


def test_complete_value_term_adds_back_the_bootstrap():
    """With truncated_value=complete a truncated model row's value term gains gamma^T V(s_T) (what its
    continuation telescopes to), so it is V(s_0); terminal rows and the other terms are unchanged."""
    batch = collate(_traces(seed=5, n=12))
    truncated = ~batch.terminal & ~batch.from_data
    assert truncated.any()
    logits = _logits(batch)
    p0 = ObjectiveParams(bkspc_id=BK, chi2_weight=0.05)
    p1 = ObjectiveParams(bkspc_id=BK, chi2_weight=0.05, truncated_value="complete")
    _, m0 = sequence_match_loss(logits, batch, p0)
    _, m1 = sequence_match_loss(logits, batch, p1)
    v = state_values(logits, batch, BK)  # [B, T+1]
    n = batch.action_mask.sum(1)  # T per row: s_T = v[b, T]
    tail = torch.stack([p0.gamma ** n[b] * v[b, n[b]] for b in range(len(n))])
    got = float(m1["loss/value_model"]) - float(m0["loss/value_model"])
    want = float((tail * truncated).sum() / (~batch.from_data).sum())
    assert abs(want) > 0.01 and got == pytest.approx(want, rel=1e-5, abs=1e-5)
    for k in ("loss/value_data", "loss/data_term", "loss/chi2_model", "loss/chi2_data"):
        assert float(m0[k]) == pytest.approx(float(m1[k]), rel=1e-12), k


def test_bkspc_discount_keeps_the_mle_identity():
    """With per-transition discounts g_t (gamma * delta on <bkspc>) and weights prod_{k<t} g_k, the mle
    loss is still the weighted cross-entropy of the imitated steps: -r_t + V(s_t) - g_t V(s_{t+1}) =
    -log pi(a_t|s_t) (the noise steps telescope away)."""
    traces = [t for t in _traces(seed=7, n=12) if t.from_data]
    batch = collate(traces)
    logits = _logits(batch, 1)
    p = ObjectiveParams(bkspc_id=BK, divergence="mle", gamma=0.9, bkspc_discount=0.5)
    loss, _ = sequence_match_loss(logits, batch, p)
    q = logits.float().reshape(-1, V)
    flat = batch.flat_state_index()
    v = state_values(logits, batch, BK)  # <bkspc> excluded at the prompt boundary
    ref = 0.0
    for b in range(len(traces)):
        w = 1.0
        for t in range(int(batch.action_mask[b].sum())):
            a = int(batch.actions[b, t])
            if not bool(batch.is_noise[b, t]):
                ref -= w * float(q[flat[b, t], a] - v[b, t])
            w *= p.gamma * (p.bkspc_discount if a == BK else 1.0)
    assert float(loss) == pytest.approx(ref / len(traces), rel=1e-5)


@pytest.mark.parametrize("kw", [{"truncated_value": "complete"}, {"bkspc_discount": 0.7}])
def test_chunked_path_gets_the_same_remedy(kw):
    """The chunked loss (masked_scores: the head on the states only) feeds the same objective, so each
    remedy gives the same loss and gradients there as over the full logits."""
    model = tiny_models(V, hidden=32)["llama"]
    batch = collate(_traces(seed=3, n=16))
    p = ObjectiveParams(bkspc_id=BK, chi2_weight=0.05, **kw)
    l_ref, _ = sequence_match_loss(masked_logits(model, batch, "sdpa"), batch, p)
    l_ref.backward()
    g_ref = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    l_got, _ = sequence_match_loss(masked_scores(model, batch, BK, "split", chunk=5), batch, p)
    l_got.backward()
    assert abs(float(l_got.detach()) - float(l_ref.detach())) <= 1e-5 * max(1.0, abs(float(l_ref.detach())))
    for n, q in model.named_parameters():
        assert (q.grad - g_ref[n]).abs().max() <= 1e-5 * g_ref[n].abs().max().clamp_min(1e-12), n
    base, _ = sequence_match_loss(
        masked_logits(model, batch, "sdpa"), batch, ObjectiveParams(BK, chi2_weight=0.05)
    )
    # the remedy changes the loss on this batch
    assert abs(float(base.detach()) - float(l_ref.detach())) > 1e-6


def test_the_config_knobs_reach_the_step():
    from sm_dist.config import LearnerConfig, ObjectiveConfig
    from sm_dist.learner.step import objective_params

    o = ObjectiveConfig(truncated_value="complete", bkspc_discount=0.9)
    p = objective_params(o, LearnerConfig(), bkspc_id=BK, on_gpu=False).objective
    assert (p.truncated_value, p.bkspc_discount) == ("complete", 0.9)
    with pytest.raises(ValueError):
        ObjectiveConfig(truncated_value="drop")
