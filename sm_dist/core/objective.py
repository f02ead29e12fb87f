"""The SequenceMatch objective and its relatives (DESIGN §1), as pure functions over tensors.

Raw logits are soft Q-values: pi(a|s) = softmax(l(.|s))[a], V(s) = logsumexp_a l(a|s) (with <bkspc>
excluded at the prompt boundary, where it is no action). For a transition (s_t, a_t, s_{t+1}):

    r_t = l(a_t|s_t) - gamma * V(s_{t+1}),      V(terminal) = 0, a truncated s_T keeps its own V.

Written as a loss to minimise (IQ-Learn with phi; chi^2-mixture = SequenceMatch):

    L_SM = - E_data[ w(r) * r ]             data term; w = phi'(r) without gradient (w = 1 for chi^2)
           + c * E_mix[ r^2 ]               chi^2 term (on data only for `chi2`; absent for kl/js/hellinger)
           + E_mix[ V(s_t) - gamma V(s_{t+1}) ]  value term

where E_x[g] = (1/#sequences of x) * sum_sequences sum_t gamma^t g_t and E_mix = a*E_data + (1-a)*E_model
(a = `data_mix`, 1/2 by default). Time t counts actions, noise and backspaces included. Each divergence
is one entry of `DIVERGENCE_SPECS` (its phi' weight and where its chi^2 and value terms apply).

Departures, deliberate: the (1-gamma) factor of the discounted occupancy is dropped (a constant: it
would only rescale the gradient relative to cross-entropy); normalisation is per sequence, never per
sequence length (a per-length average is not a proper scoring rule). With phi(x) = x and the value term
on data only (`mle`), the loss is exactly the gamma^t-weighted cross-entropy, since
-r_t + V(s_t) - gamma V(s_{t+1}) = V(s_t) - l(a_t|s_t) = -log pi(a_t|s_t).

Masked noise steps (`mask_noise_actions`, DESIGN §2). An augmented data row holds injected noise
actions that the expert never chose; the wrong token must not be imitated, but its state and the
`<bkspc>` that follows must stay. The value term telescopes over a whole row,
sum_t gamma^t (V(s_t) - gamma V(s_{t+1})) = V(s_0) (minus gamma^T V(s_T) if truncated), so it holds
every step, noise included. If a noise step were simply dropped from the data term, the linear part on
a data row would be

    - sum_{clean t} gamma^t r_t + V(s_0) = sum_{clean t} gamma^t (-log pi(a_t|s_t))
                                          + sum_{noise t} gamma^t (V(s_t) - gamma V(s_{t+1}))

and the leftover noise sum is unbounded below: the optimiser lowers V before every noise token and
raises it after, i.e. it learns to *write* the noise token (measured on an exact tabular problem: loss
-25 -> -44 -> -66 at steps 800/1600/3200, pi(noise | start) = 0.11). So at a masked step the data term
uses the telescoping difference instead of the reward,

    r~_t = V(s_t) - gamma V(s_{t+1})        (weight 1, with gradient),

which cancels that step's value-term contribution exactly: the linear part of a data row becomes the
cross-entropy of its clean steps alone (the `mle` identity with noise steps skipped), whatever the
divergence. The chi^2 term skips masked steps on data rows too: it is the quadratic part of phi on the
expert occupancy, and a noise action is not an expert action; penalising its r^2 would pull
l(noise|s) - gamma V(s') towards 0, i.e. raise the noise token's probability (the opposite of the
intent). On model rows every step counts (a rollout's own mistakes are the model's actions). With
`mask_noise_actions=false` noise actions are ordinary data actions (imitated, chi^2-penalised).

A `<bkspc>` taken at the prompt boundary (a no-op the policy cannot take) is dropped from every term.

Write/delete loops (issue 23; tests/unit/test_tabular.py, the loop case). Where the noise does not
cover the model's own error x at s, the state s+x is on model rows only, and only c * E_model[r^2] and
the value term act there. On a full model row the value term telescopes to V(s_0); on a row truncated
after T actions it is V(s_0) - gamma^T V(s_T), which rewards raising V wherever rollouts are cut off.
A write/delete cycle s -> s+y -> s lets V grow at almost no chi^2 cost: r = 0 on both transitions
means l(y|s) = gamma V(s+y) and l(<bkspc>|s+y) = gamma V(s), consistent with V(s) ~ gamma^2 V(s), so a
cycle costs c ((1 - gamma^2) V)^2, 4e-3 V at gamma = 0.998. Cycles get truncated, truncation pays for
V, and V of the error state grows without bound (the exact tabular case: pi(<bkspc> | error) -> 0,
V(error) 31 after 400 steps and rising, the loss below zero and falling). Two remedies, each a knob:

* `bkspc_discount` delta: the discount of a <bkspc> transition is g_t = gamma * delta, the time
  weights prod_{k<t} g_k (a semi-MDP where a deletion costs time). Every identity above holds with
  g_t in place of gamma (the `mle` identity, the telescoping, the masked-noise difference), and a
  cycle now costs c ((1 - gamma^2 delta) V)^2. It does not stop the loop: the bootstrap's reward is
  linear in V, the cost quadratic with a tiny coefficient (delta = 0.9: V(error) 31 at 400 steps, as
  without it).
* `truncated_value = "complete"`: a truncated row's value term is V(s_0), i.e. + gamma^T V(s_T) (with
  g_t: prod_t g_t V(s_T)). This is exact, not a heuristic: whatever the continuation after s_T, its
  terms telescope to gamma^T V(s_T), so V(s_0) is the value term of the whole (untruncated) occupancy;
  the bootstrap is the truncation's bias. The chi^2 term keeps its truncated sum (its tail is a
  non-negative quantity the rollout did not see). On the tabular case the loop is gone: V(error) stays
  near 0 and the policy at the error state keeps a mild preference for <bkspc> (as BC leaves it);
  learning to *delete* the error still needs noise that covers it. Default "bootstrap" (the paper).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from sm_dist.core.traces import TraceBatch


def _w_one(r: torch.Tensor, clip: float) -> torch.Tensor:
    return torch.ones_like(r)


def _w_kl(r: torch.Tensor, clip: float) -> torch.Tensor:  # phi(x) = -exp(-(x+1))
    return torch.exp(-r - 1)


def _w_js(r: torch.Tensor, clip: float) -> torch.Tensor:  # phi(x) = log(2 - exp(-x))
    e = torch.exp(-r)
    return torch.where(e < 2, e / (2 - e).clamp_min(1e-6), torch.full_like(r, clip))


def _w_hellinger(r: torch.Tensor, clip: float) -> torch.Tensor:  # phi(x) = x / (1 + x)
    return torch.where(r > -1, 1.0 / (1 + r).clamp_min(1e-6) ** 2, torch.full_like(r, clip))


@dataclass(frozen=True)
class DivergenceSpec:
    """One divergence: its data-term weight phi'(r) and where its chi^2 and value terms apply.

    chi2: "mix" (E_mix, SequenceMatch), "data" (E_data), or None. value: "mix" (IQ-Learn: any
    occupancy) or "data" (on the imitated data steps only, which makes the loss the cross-entropy).
    """

    phi_prime: Callable[[torch.Tensor, float], torch.Tensor]
    chi2: Literal["mix", "data"] | None
    value: Literal["mix", "data"]


# Adding a divergence = one entry here and its kind in sm_dist/config/objective.py (with its parameters);
# tests/unit/test_config_registries.py checks the two name the same divergences.
DIVERGENCE_SPECS: dict[str, DivergenceSpec] = {
    "chi2_mixture": DivergenceSpec(_w_one, chi2="mix", value="mix"),
    "chi2": DivergenceSpec(_w_one, chi2="data", value="mix"),
    "kl": DivergenceSpec(_w_kl, chi2=None, value="mix"),
    "js": DivergenceSpec(_w_js, chi2=None, value="mix"),
    "hellinger": DivergenceSpec(_w_hellinger, chi2=None, value="mix"),
    "mle": DivergenceSpec(_w_one, chi2=None, value="data"),
}
DIVERGENCES: tuple[str, ...] = tuple(DIVERGENCE_SPECS)


@dataclass(frozen=True)
class ObjectiveParams:
    """Plain parameters of the objective (the learner builds these from the validated config)."""

    bkspc_id: int
    divergence: str = "chi2_mixture"  # a key of DIVERGENCE_SPECS
    gamma: float = 0.998
    # c, in logit units: alpha = 0.01 read as IQ-Learn's soft-Q temperature gives c = alpha/(4 alpha_chi)
    # ~ 0.0025-0.005 (the likely reading); read as c = 1/(4 alpha) it is 25 (unlikely: destroys the policy)
    chi2_weight: float = 1e-3
    data_mix: float = 0.5  # weight of the data occupancy in E_mix
    mask_noise_actions: bool = True
    weight_clip: float = 10.0  # cap on phi'(r) for kl/js/hellinger, whose weights diverge for very negative r
    bkspc_discount: float = 1.0  # delta: a <bkspc> transition discounts by gamma * delta (module docstring)
    truncated_value: Literal["bootstrap", "complete"] = "bootstrap"  # value term of a truncated row

    def __post_init__(self):  # the config (sm_dist/config/objective.py) validates ranges for users
        assert self.divergence in DIVERGENCES, self.divergence
        assert 0.0 < self.gamma <= 1.0 and 0.0 < self.bkspc_discount <= 1.0, (self.gamma, self.bkspc_discount)
        assert self.chi2_weight >= 0 and 0.0 <= self.data_mix <= 1.0, (self.chi2_weight, self.data_mix)
        assert self.truncated_value in ("bootstrap", "complete"), self.truncated_value


def phi_prime(r: torch.Tensor, divergence: str, clip: float) -> torch.Tensor:
    """IQ-Learn's phi'(r), the data-term weight (no gradient), capped at `clip`. chi^2 and mle: 1."""
    return DIVERGENCE_SPECS[divergence].phi_prime(r.detach(), clip).clamp(max=clip)


@dataclass
class StateScores:
    """What the objective reads of the logits, fp32: v [B, T+1] = V(s_t) (<bkspc> excluded at the
    prompt boundary), q [B, T] = l(a_t|s_t); finite but never used on padding. From full logits
    (`scores_from_logits`) or from hidden states chunk by chunk (`sm_dist.core.forward.masked_scores`)."""

    v: torch.Tensor
    q: torch.Tensor


def scores_from_logits(logits: torch.Tensor, batch: TraceBatch, bkspc_id: int) -> StateScores:
    """logits [R, N, V] of the batch's rows -> StateScores of its sequences.

    logsumexp runs once over the [R, N, V] logits; only the few boundary states are recomputed with
    the <bkspc> column masked (no [B, T, V] copy of the logits).
    """
    logits = logits.float()
    V = logits.shape[-1]
    flat = batch.flat_state_index()  # [B, T+1]
    lse = torch.logsumexp(logits, dim=-1).reshape(-1)  # [R * N]
    v = lse[flat]  # [B, T+1]
    b, t = batch.boundary_b, batch.boundary_t
    if b.numel():
        rows = logits.reshape(-1, V)[flat[b, t]].clone()  # [K, V]
        rows[:, bkspc_id] = float("-inf")
        v = v.index_put((b, t), torch.logsumexp(rows, dim=-1))
    T = batch.actions.shape[1]
    q = logits.reshape(-1, V)[flat[:, :T], batch.actions]  # [B, T]
    return StateScores(v=v, q=q)


def state_values(logits: torch.Tensor, batch: TraceBatch, bkspc_id: int) -> torch.Tensor:
    """V(s_t) = logsumexp l(.|s_t), [B, T+1] fp32; <bkspc> excluded where the prompt boundary is."""
    return scores_from_logits(logits, batch, bkspc_id).v


def transitions(
    logits: torch.Tensor | StateScores, batch: TraceBatch, p: ObjectiveParams
) -> dict[str, torch.Tensor]:
    """Per-transition tensors, all [B, T] fp32: q = l(a_t|s_t), v = V(s_t), v_next = V(s_{t+1}), the
    discount g_t of each transition (gamma; gamma * bkspc_discount on a <bkspc>), r = q - g v_next, and
    the time weights w_t = prod_{k<t} g_k (gamma^t when bkspc_discount = 1), zero on padding and on
    boundary <bkspc> actions."""
    sc = logits if isinstance(logits, StateScores) else scores_from_logits(logits, batch, p.bkspc_id)
    B, T = batch.actions.shape
    dev = sc.v.device
    q, v_all = sc.q, sc.v
    v, v_next = v_all[:, :T], v_all[:, 1:]
    t_idx = torch.arange(T, device=dev)[None, :]
    last = t_idx == (batch.action_mask.sum(1, keepdim=True) - 1)
    v_next = torch.where(last & batch.terminal[:, None], torch.zeros_like(v_next), v_next)
    boundary_bk = (batch.actions == p.bkspc_id) & ~batch.bkspc_allowed[:, :T]
    valid = batch.action_mask & ~boundary_bk
    if p.bkspc_discount == 1.0:
        g = torch.full_like(q, p.gamma)
        w = (p.gamma ** t_idx.float()) * valid.float()
    else:  # per-transition discounts; a boundary <bkspc> (a no-op, dropped) discounts nothing extra
        bk = (batch.actions == p.bkspc_id) & valid
        g = torch.where(bk, torch.full_like(q, p.gamma * p.bkspc_discount), torch.full_like(q, p.gamma))
        w = torch.cumprod(torch.cat([torch.ones_like(g[:, :1]), g[:, :-1]], dim=1), dim=1) * valid.float()
    r = q - g * v_next
    return {"q": q, "v": v, "v_next": v_next, "g": g, "r": r, "w": w, "valid": valid, "last": last}


def _expect(per_seq: torch.Tensor, seq_mask: torch.Tensor, seq_w: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the sequences in `seq_mask` of per-sequence sums (0 if there are none)."""
    w = seq_w * seq_mask
    return (per_seq * w).sum() / w.sum().clamp_min(1e-12)


def _mix(data: torch.Tensor, model: torch.Tensor, batch: TraceBatch, a: float) -> torch.Tensor:
    """E_mix = a E_data + (1-a) E_model from the two expectations; falls back to whichever occupancy
    the batch has (e.g. data only during the BC warmup)."""
    if batch.has_data and batch.has_model:
        return a * data + (1 - a) * model
    return data if batch.has_data else model


def sequence_match_loss(
    logits: torch.Tensor | StateScores, batch: TraceBatch, p: ObjectiveParams, check_finite: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DESIGN §1 loss for `p.divergence` on logits [R, N, V] (or their StateScores); returns
    (loss, metrics).

    Rows with `batch.from_data` are data (augmented expert) sequences, the others model rollouts.
    Metrics are detached 0-d tensors (no device sync here; `float()` them after backward).
    `check_finite=False` leaves the (synchronising) non-finite check to the caller.
    """
    tr = transitions(logits, batch, p)
    spec = DIVERGENCE_SPECS[p.divergence]
    dev = tr["q"].device
    is_data = batch.from_data.to(dev)[:, None]  # [B, 1]
    sw = batch.seq_weight.to(dev, torch.float32)
    w = tr["w"]  # gamma^t on valid steps, [B, T]
    masked = batch.is_noise.to(dev) & is_data if p.mask_noise_actions else torch.zeros_like(is_data)
    w_data = w * is_data.float()  # every step of a data row
    w_imit = w_data * (~masked).float()  # data steps whose action is imitated
    w_model = w * (~is_data).float()
    r = tr["r"]
    dv = tr["v"] - tr["g"] * tr["v_next"]  # V(s_t) - g_t V(s_{t+1}), the telescoping difference
    dv_value = dv  # what the value term sums
    if p.truncated_value == "complete":  # + g_T V(s_T) at a truncated row's last step (v_next = 0 when
        dv_value = dv + tr["last"] * tr["g"] * tr["v_next"]  # terminal): each row's value term is V(s_0)
    # data term: phi'(r) r on imitated steps, r~ = dv on masked noise steps (module docstring)
    phi_r = w_imit * phi_prime(r, p.divergence, p.weight_clip) * r + (w_data - w_imit) * dv
    data_term = -_expect(phi_r.sum(1), is_data[:, 0], sw)
    r2_data = _expect((w_imit * r.pow(2)).sum(1), is_data[:, 0], sw)
    r2_model = _expect((w_model * r.pow(2)).sum(1), ~is_data[:, 0], sw)
    value_data = _expect((w_data * dv_value).sum(1), is_data[:, 0], sw)
    value_model = _expect((w_model * dv_value).sum(1), ~is_data[:, 0], sw)
    zero = torch.zeros((), device=dev)
    chi2_term = {
        "mix": p.chi2_weight * _mix(r2_data, r2_model, batch, p.data_mix),
        "data": p.chi2_weight * r2_data,
        None: zero,
    }[spec.chi2]
    value_term = value_data if spec.value == "data" else _mix(value_data, value_model, batch, p.data_mix)
    loss = data_term + chi2_term + value_term
    metrics = _metrics(loss, data_term, chi2_term, value_term, tr, is_data[:, 0])
    metrics |= {  # each term's size on each kind of row, before mixing (issue: what rollouts contribute)
        "loss/chi2_data": (p.chi2_weight * r2_data).detach(),
        "loss/chi2_model": (p.chi2_weight * r2_model).detach(),
        "loss/value_data": value_data.detach(),
        "loss/value_model": value_model.detach(),
    }
    if check_finite:
        raise_if_not_finite(loss, logits, metrics)
    return loss, metrics


def raise_if_not_finite(loss: torch.Tensor, logits: torch.Tensor | StateScores, metrics: dict) -> None:
    """Raise FloatingPointError naming the bad logits (or the loss terms) if `loss` is not finite."""
    if bool(torch.isfinite(loss)):
        return
    _check_finite(logits)  # names the bad logits if they are the cause
    terms = {k: float(v) for k, v in metrics.items() if k.startswith("loss/")}
    raise FloatingPointError(
        f"non-finite loss {float(loss)} (terms {terms}) from finite logits; check gamma/chi2_weight and the batch"
    )


def _metrics(loss, data_term, chi2_term, value_term, tr, is_data) -> dict[str, torch.Tensor]:
    valid = tr["valid"]
    vd, vm = valid & is_data[:, None], valid & ~is_data[:, None]

    def mean(x, m):  # nan when m is empty (0/0), without a host sync
        return (x.detach() * m).sum() / m.sum()

    return {
        "loss/total": loss.detach(),
        "loss/data_term": data_term.detach(),
        "loss/chi2_term": chi2_term.detach(),
        "loss/value_term": value_term.detach(),
        "r/mean_data": mean(tr["r"], vd),
        "r/mean_model": mean(tr["r"], vm),
        "v/mean": mean(tr["v"], valid),
        "v/s0_mean": tr["v"].detach()[:, 0].mean(),
    }


def bc_loss(
    logits: torch.Tensor | StateScores, batch: TraceBatch, p: ObjectiveParams, check_finite: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Behaviour cloning on the data rows: the `mle` objective (gamma^t-weighted cross-entropy)."""
    mle = ObjectiveParams(
        bkspc_id=p.bkspc_id, divergence="mle", gamma=p.gamma, mask_noise_actions=p.mask_noise_actions,
        bkspc_discount=p.bkspc_discount,
    )  # fmt: skip
    return sequence_match_loss(logits, batch, mle, check_finite=check_finite)


def training_loss(
    logits: torch.Tensor | StateScores,
    batch: TraceBatch,
    p: ObjectiveParams,
    step: int,
    warmup_steps: int,
    sm_lambda: float,
    check_finite: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """The paper's schedule: BC for `warmup_steps`, then (1 - lambda) L_BC + lambda L_SM.

    Each term is computed only when its weight is non-zero (BC needs data rows).
    """
    if not 0.0 <= sm_lambda <= 1.0:
        raise ValueError(f"sm_lambda={sm_lambda} must be in [0, 1]")
    if step < warmup_steps or p.divergence == "mle" or sm_lambda == 0.0:
        l_bc, m_bc = bc_loss(logits, batch, p, check_finite)
        return l_bc, {**m_bc, "loss/bc": m_bc["loss/total"], "loss/sm_lambda": 0.0}
    l_sm, m_sm = sequence_match_loss(logits, batch, p, check_finite)
    if sm_lambda == 1.0:
        return l_sm, {**m_sm, "loss/sm": m_sm["loss/total"], "loss/sm_lambda": 1.0}
    l_bc, m_bc = bc_loss(logits, batch, p, check_finite)
    loss = (1 - sm_lambda) * l_bc + sm_lambda * l_sm
    return loss, {
        **m_sm,
        "loss/bc": m_bc["loss/total"],
        "loss/sm": m_sm["loss/total"],
        "loss/total": loss.detach(),
        "loss/sm_lambda": sm_lambda,
    }


def _check_finite(logits: torch.Tensor | StateScores) -> None:
    if isinstance(logits, StateScores):
        for name, x in (("V(s)", logits.v), ("l(a|s)", logits.q)):
            if not torch.isfinite(x).all():
                bad = (~torch.isfinite(x)).nonzero()[:4].tolist()
                raise FloatingPointError(
                    f"non-finite {name} at [sequence, step] {bad}: the model produced NaN/inf; lower the "
                    "learning rate or check the inputs"
                )
        return
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).nonzero()[:4].tolist()
        raise FloatingPointError(
            f"non-finite logits at [batch, position, token] {bad} (of {int((~torch.isfinite(logits)).sum())}): "
            "the model produced NaN/inf; lower the learning rate or check the inputs"
        )
