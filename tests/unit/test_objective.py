"""The objective against an independent plain-Python reference, and the MLE special case (DESIGN §1)."""

import math
import random

import pytest
import torch

from sm_dist.core.objective import DIVERGENCES, ObjectiveParams, sequence_match_loss, training_loss
from sm_dist.core.traces import augment_noise, build_inputs, collate

V, BK, EOS = 12, 11, 10


def _traces(seed: int, n: int = 10):
    """Data traces (augmented, terminal) and model traces (random, some truncated, some with <bkspc>)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        prompt = [rng.randrange(10) for _ in range(rng.randint(1, 4))]
        if k % 2 == 0:
            target = [rng.randrange(10) for _ in range(rng.randint(1, 6))] + [EOS]
            acts, noise = augment_noise(target, BK, 0.3, list(range(10)), rng)
            out.append(build_inputs(prompt, acts, BK, eos_id=EOS, is_noise=noise, from_data=True))
        else:
            acts = [BK if rng.random() < 0.25 else rng.randrange(10) for _ in range(rng.randint(1, 7))]
            if rng.random() < 0.5:
                acts.append(EOS)
            out.append(build_inputs(prompt, acts, BK, eos_id=EOS, from_data=False))
    return out


def _phi_prime(r: float, div: str, clip: float) -> float:
    if div == "kl":
        return min(math.exp(-r - 1), clip)
    if div == "js":
        e = math.exp(-r)
        return min(e / (2 - e), clip) if e < 2 else clip
    if div == "hellinger":
        return min(1 / (1 + r) ** 2, clip) if r > -1 else clip
    return 1.0


def reference_loss(logits: torch.Tensor, traces, p: ObjectiveParams) -> torch.Tensor:
    """Per-transition loops over sequences and time, nothing vectorised (the DESIGN §1 equations)."""
    sums = {"data": [], "model": []}  # per sequence: (data_term, r2, value)
    for b, tr in enumerate(traces):
        n_state = tr.num_actions + 1
        V_s = []
        for t in range(n_state):
            row = logits[b, int(tr.state_index[t])]
            if not bool(tr.bkspc_allowed[t]):
                row = torch.cat([row[:BK], row[BK + 1 :]])
            V_s.append(torch.logsumexp(row, 0))
        d_term, r2, value = 0.0, 0.0, 0.0
        for t in range(tr.num_actions):
            a = int(tr.actions[t])
            if a == BK and not bool(tr.bkspc_allowed[t]):
                continue  # a no-op the policy cannot take
            g = p.gamma**t
            q = logits[b, int(tr.state_index[t]), a]
            terminal_next = tr.terminal and t == tr.num_actions - 1
            v_next = 0.0 if terminal_next else V_s[t + 1]
            r = q - p.gamma * v_next
            masked = tr.from_data and p.mask_noise_actions and bool(tr.is_noise[t])
            if tr.from_data and not masked:
                d_term = d_term - g * _phi_prime(r.item(), p.divergence, p.weight_clip) * r
            if masked:  # a noise step: the telescoping difference, never the noise action's reward
                d_term = d_term - g * (V_s[t] - p.gamma * v_next)
            value = value + g * (V_s[t] - p.gamma * v_next)
            if not masked:
                r2 = r2 + g * r * r
        sums["data" if tr.from_data else "model"].append((d_term, r2, value))

    def mean(xs):
        return sum(xs) / len(xs)

    data_term = mean([s[0] for s in sums["data"]])
    if p.divergence == "mle":
        return data_term + mean([s[2] for s in sums["data"]])
    a = p.data_mix

    def mix(i):
        return a * mean([s[i] for s in sums["data"]]) + (1 - a) * mean([s[i] for s in sums["model"]])

    chi2 = {"chi2_mixture": mix(1), "chi2": mean([s[1] for s in sums["data"]])}.get(p.divergence, 0.0)
    return data_term + p.chi2_weight * chi2 + mix(2)


@pytest.mark.parametrize("mask_noise", [True, False])
@pytest.mark.parametrize("div", DIVERGENCES)
def test_vectorised_matches_reference_with_gradient(div, mask_noise):
    torch.manual_seed(0)
    traces = _traces(seed=3)
    batch = collate(traces)
    p = ObjectiveParams(
        bkspc_id=BK, divergence=div, gamma=0.9, chi2_weight=0.3, mask_noise_actions=mask_noise
    )
    logits = (2 * torch.randn(len(traces), batch.input_ids.shape[1], V, dtype=torch.float64)).requires_grad_()
    loss, metrics = sequence_match_loss(logits, batch, p)
    (g,) = torch.autograd.grad(loss, logits)
    logits_ref = logits.detach().clone().requires_grad_()  # noqa: the reference gets its own leaf
    ref = reference_loss(logits_ref, traces, p)
    (g_ref,) = torch.autograd.grad(ref, logits_ref)
    loss, ref = loss.item(), ref.item()
    assert abs(loss - ref) <= 1e-5 * max(1.0, abs(ref))
    assert (g - g_ref).abs().max().item() <= 1e-5
    assert math.isclose(metrics["loss/total"], loss, rel_tol=1e-6)


def test_mle_is_gamma_weighted_cross_entropy():
    """With phi(x)=x and the value term on data only, L = sum_t gamma^t * CE_t (per-sequence mean)."""
    torch.manual_seed(1)
    traces = [t for t in _traces(seed=7, n=16) if t.from_data]
    batch = collate(traces)
    gamma = 0.97
    logits = torch.randn(len(traces), batch.input_ids.shape[1], V)
    loss, _ = sequence_match_loss(logits, batch, ObjectiveParams(bkspc_id=BK, divergence="mle", gamma=gamma))
    ce_total = 0.0
    for b, tr in enumerate(traces):
        for t in range(tr.num_actions):
            if bool(tr.is_noise[t]):
                continue
            row = logits[b, int(tr.state_index[t])].clone()
            if not bool(tr.bkspc_allowed[t]):
                row[BK] = -math.inf  # <bkspc> is not an action at the prompt boundary
            ce = torch.nn.functional.cross_entropy(row[None], tr.actions[t : t + 1])
            ce_total += gamma**t * float(ce)
    assert abs(float(loss) - ce_total / len(traces)) <= 1e-6 * max(1.0, ce_total / len(traces))


def test_normalisation_is_per_sequence_not_per_length():
    """Doubling a sequence's length must not halve its per-token weight (no per-length averaging)."""
    short = build_inputs([1], [2, EOS], BK, eos_id=EOS)
    long = build_inputs([1], [2, 2, 2, 2, EOS], BK, eos_id=EOS)
    logits = torch.zeros(1, 6, V)
    p = ObjectiveParams(bkspc_id=BK, divergence="mle", gamma=1.0)
    l_short, _ = sequence_match_loss(logits[:, :3], collate([short]), p)
    l_long, _ = sequence_match_loss(logits, collate([long]), p)
    # uniform logits: CE = log(V-1) at the prompt boundary (<bkspc> excluded), log V elsewhere; summed
    assert math.isclose(l_short.item(), math.log(V - 1) + math.log(V), rel_tol=1e-6)
    assert math.isclose(l_long.item(), math.log(V - 1) + 4 * math.log(V), rel_tol=1e-6)


def test_truncated_bootstraps_terminal_does_not():
    tr_term = build_inputs([1], [2, EOS], BK, eos_id=EOS)
    tr_trunc = build_inputs([1], [2, 3], BK, eos_id=EOS)
    assert tr_term.terminal and not tr_trunc.terminal
    logits = torch.randn(1, 3, V)
    p = ObjectiveParams(bkspc_id=BK, divergence="chi2_mixture", gamma=0.9, chi2_weight=0.0)
    l_term, _ = sequence_match_loss(logits, collate([tr_term]), p)
    l_trunc, _ = sequence_match_loss(logits, collate([tr_trunc]), p)
    # Only data rows: L = -sum g^t r_t + sum g^t (V_t - g V_{t+1}) = sum g^t (V_t - q_t); with the same
    # logits, the two differ only through q at t=1 (EOS vs 3) — both bootstrap identically in L.
    v = torch.logsumexp(logits[0], -1)
    v[0] = torch.logsumexp(torch.cat([logits[0, 0, :BK], logits[0, 0, BK + 1 :]]), 0)  # boundary state
    exp_term = (v[0] - logits[0, 0, 2]) + 0.9 * (v[1] - logits[0, 1, EOS])
    exp_trunc = (v[0] - logits[0, 0, 2]) + 0.9 * (v[1] - logits[0, 1, 3])
    assert torch.allclose(l_term, exp_term, atol=1e-6) and torch.allclose(l_trunc, exp_trunc, atol=1e-6)
    # r differs: terminal r_1 = q, truncated r_1 = q - gamma V(s_2)
    from sm_dist.core.objective import transitions

    r_term = transitions(logits, collate([tr_term]), p)["r"][0, 1]
    r_trunc = transitions(logits, collate([tr_trunc]), p)["r"][0, 1]
    assert torch.isclose(r_term, logits[0, 1, EOS])
    assert torch.isclose(r_trunc, logits[0, 1, 3] - 0.9 * v[2])


def test_schedule_warmup_then_mixture():
    traces = _traces(seed=5)
    batch = collate(traces)
    logits = torch.randn(len(traces), batch.input_ids.shape[1], V)
    p = ObjectiveParams(bkspc_id=BK, divergence="chi2_mixture", gamma=0.95, chi2_weight=0.1)
    l_bc, m = training_loss(logits, batch, p, step=0, warmup_steps=10, sm_lambda=0.5)
    l_sm, _ = sequence_match_loss(logits, batch, p)
    l_mix, m2 = training_loss(logits, batch, p, step=10, warmup_steps=10, sm_lambda=0.5)
    assert m["loss/sm_lambda"] == 0.0 and m2["loss/sm_lambda"] == 0.5
    assert torch.allclose(l_mix, 0.5 * l_bc + 0.5 * l_sm)


def test_nan_logits_are_named():
    traces = _traces(seed=2)
    batch = collate(traces)
    logits = torch.randn(len(traces), batch.input_ids.shape[1], V)
    logits[1, 0, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        sequence_match_loss(logits, batch, ObjectiveParams(bkspc_id=BK))


def test_bad_params_fail_fast():
    """The config gives users the message (tests/unit/test_config.py); the params only assert."""
    with pytest.raises(AssertionError, match="tv"):
        ObjectiveParams(bkspc_id=BK, divergence="tv")
    with pytest.raises(AssertionError, match="1.5"):
        ObjectiveParams(bkspc_id=BK, gamma=1.5)
    with pytest.raises(AssertionError, match="-1"):
        ObjectiveParams(bkspc_id=BK, chi2_weight=-1)
