"""A small enumerable sequence problem with a free logit table, solved with exact expectations.

Vocabulary: 0 <bos> (the prompt), 1 A, 2 B, 3 <eos>, 4 <bkspc>. A state is the tuple of generated
tokens; tokens are allowed while len(state) < max_len, <eos> always, <bkspc> (when enabled) whenever
something was generated. The data and the current policy are enumerated trace by trace, so E_data and
E_model are exact weighted sums; the policy's occupancy is re-enumerated (its weights recomputed,
without gradient) after every update, as the rollouts would be. The objective is the project's own
vectorised `sequence_match_loss`, fed table logits through the same single-pass layout.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from sm_dist.core.objective import ObjectiveParams, sequence_match_loss
from sm_dist.core.traces import build_inputs, collate

BOS, A, B, EOS, BK = 0, 1, 2, 3, 4
V = 5
NEG = -1e4  # logit of a disallowed action (constant: not a parameter)


@dataclass
class Problem:
    max_len: int
    with_bkspc: bool
    data: dict[tuple[int, ...], float]  # action trace -> probability
    noise: dict[tuple[int, ...], tuple[bool, ...]]  # action trace -> which actions are noise
    states: list[tuple[int, ...]]

    def allowed(self, s: tuple[int, ...]) -> list[int]:
        acts = [EOS] + ([A, B] if len(s) < self.max_len else [])
        return acts + ([BK] if self.with_bkspc and len(s) > 0 else [])


def _walk(trace):
    """States s_0..s_T visited by an action trace."""
    s, out = (), [()]
    for a in trace:
        s = s[:-1] if a == BK else (s + (a,) if a != EOS else s)
        out.append(s)
    return out


def make_problem(data_cond, max_len: int, p_noise: float = 0.0, noise_from: int = 0) -> Problem:
    """Enumerate the data traces of a data policy `data_cond(state) -> {action: prob}` with the paper's
    noise augmentation (before each true token, with prob p_noise: a wrong token then <bkspc>), at
    states of at least `noise_from` tokens (1: the first step's mistakes are never covered)."""
    data: dict[tuple[int, ...], float] = {}
    noise: dict[tuple[int, ...], tuple[bool, ...]] = {}

    def rec(s, trace, flags, prob):
        for a, q in data_cond(s).items():
            if q == 0:
                continue
            options = [((), (), 1.0 - p_noise if p_noise else 1.0)]
            if p_noise and noise_from <= len(s) < max_len:
                wrong = [n for n in (A, B) if n != a]
                options += [((n, BK), (True, False), p_noise / len(wrong)) for n in wrong]
            for extra, fl, pe in options:
                t2, f2, p2 = trace + extra + (a,), flags + fl + (False,), prob * q * pe
                if a == EOS:
                    data[t2], noise[t2] = data.get(t2, 0.0) + p2, f2
                else:
                    rec(s + (a,), t2, f2, p2)

    rec((), (), (), 1.0)
    states = [s for n in range(max_len + 1) for s in itertools.product((A, B), repeat=n)]
    return Problem(max_len, p_noise > 0, data, noise, states)


def model_traces(prob: Problem, max_actions: int) -> list[tuple[int, ...]]:
    out = []

    def rec(s, trace):
        if len(trace) == max_actions:
            out.append(trace)  # truncated: not terminal, bootstraps with V(s_T)
            return
        for a in prob.allowed(s):
            if a == EOS:
                out.append(trace + (EOS,))
            else:
                rec(s[:-1] if a == BK else s + (a,), trace + (a,))

    rec((), ())
    return out


class Solver:
    """Minimise an objective over a free logit table with exact, re-enumerated expectations."""

    def __init__(
        self,
        prob: Problem,
        p: ObjectiveParams,
        max_actions: int,
        lr: float = 0.05,
        seed: int = 0,
        fixed: dict[tuple[int, ...], dict[int, float]] | None = None,
    ):
        """`fixed`: states whose logits are given and never trained (a model that cannot fit them: it
        makes the same first-step error however it is trained), {state: {action: logit}}."""
        self.prob, self.p = prob, p
        self.sid = {s: i for i, s in enumerate(prob.states)}
        self.allowed = torch.full((len(prob.states), V), False)
        for s, i in self.sid.items():
            self.allowed[i, prob.allowed(s)] = True
        g = torch.Generator().manual_seed(seed)
        table = 0.1 * torch.randn(len(prob.states), V, generator=g, dtype=torch.float64)
        self.trainable = torch.ones(len(prob.states), 1, dtype=torch.float64)
        for s, logits in (fixed or {}).items():
            table[self.sid[s]] = 0.0
            for a, x in logits.items():
                table[self.sid[s], a] = x
            self.trainable[self.sid[s]] = 0.0
        self.table = table.requires_grad_()
        self.opt = torch.optim.Adam([self.table], lr=lr)
        d_traces = list(prob.data)
        self.m_traces = model_traces(prob, max_actions) if p.divergence != "mle" else []
        traces = [build_inputs([BOS], list(t), BK, eos_id=EOS, is_noise=prob.noise[t]) for t in d_traces]
        traces += [build_inputs([BOS], list(t), BK, eos_id=EOS, from_data=False) for t in self.m_traces]
        self.batch = collate(traces)
        n_pos = self.batch.input_ids.shape[1]
        # input position i of trace b holds state s_i (prompt length 1): map positions to table rows
        self.pos_state = torch.zeros(len(traces), n_pos, dtype=torch.long)
        Tm = max((len(t) for t in self.m_traces), default=0)
        # per model trace: the (state, action) pairs whose probabilities make up its probability
        self.m_s = torch.zeros(len(self.m_traces), Tm, dtype=torch.long)
        self.m_a = torch.zeros(len(self.m_traces), Tm, dtype=torch.long)
        self.m_mask = torch.zeros(len(self.m_traces), Tm, dtype=torch.float64)
        for b, t in enumerate(d_traces + self.m_traces):
            ids = [self.sid[s] for s in _walk(t)]
            self.pos_state[b, : len(ids)] = torch.tensor(ids)
            if b >= len(d_traces):
                k = b - len(d_traces)
                self.m_s[k, : len(t)], self.m_a[k, : len(t)], self.m_mask[k, : len(t)] = (
                    torch.tensor(ids[:-1]),
                    torch.tensor(t),
                    1.0,
                )
        self.d_weight = torch.tensor([prob.data[t] for t in d_traces], dtype=torch.float64)

    def logits(self) -> torch.Tensor:
        full = torch.where(self.allowed, self.table, torch.full_like(self.table, NEG))
        return full[self.pos_state]

    def policy(self) -> torch.Tensor:
        full = torch.where(self.allowed, self.table, torch.full_like(self.table, NEG))
        return full.detach().softmax(-1)

    def step(self) -> float:
        full = torch.where(self.allowed, self.table, torch.full_like(self.table, NEG)).detach()
        logp = full.log_softmax(-1)  # finite (NEG, not -inf) so padded entries * 0 stay 0
        m_w = ((logp[self.m_s, self.m_a] * self.m_mask).sum(1)).exp()  # exact model occupancy weights
        self.batch.seq_weight = torch.cat([self.d_weight, m_w])
        loss, _ = sequence_match_loss(self.logits(), self.batch, self.p)
        self.opt.zero_grad()
        loss.backward()
        self.table.grad *= self.trainable  # fixed states never move (Adam: a zero gradient, no step)
        self.opt.step()
        return float(loss.detach())

    def data_conditionals(self) -> dict[tuple[int, ...], torch.Tensor]:
        """gamma-weighted occupancy conditionals of the data over imitated (non-noise) actions."""
        occ: dict[tuple[int, ...], torch.Tensor] = {}
        for t, pr in self.prob.data.items():
            for k, (s, a) in enumerate(zip(_walk(t), t)):
                if self.p.mask_noise_actions and self.prob.noise[t][k]:
                    continue
                occ.setdefault(s, torch.zeros(V, dtype=torch.float64))[a] += pr * self.p.gamma**k
        return {s: o / o.sum() for s, o in occ.items()}

    def max_tv(self, skip: set[tuple[int, ...]] = frozenset()) -> float:
        pi = self.policy()
        return max(
            0.5 * float((pi[self.sid[s]] - d).abs().sum())
            for s, d in self.data_conditionals().items()
            if s not in skip
        )


def solve(prob: Problem, p: ObjectiveParams, steps: int, max_actions: int = 4, lr: float = 0.05, fixed=None):
    """Run the iteration; return (solver, losses, tv_start)."""
    solver = Solver(prob, p, max_actions=max_actions, lr=lr, fixed=fixed)
    tv0 = solver.max_tv()
    losses = [solver.step() for _ in range(steps)]
    return solver, losses, tv0


def expected_cycles(solver: Solver) -> tuple[float, float]:
    """(write/delete pairs, repeat cycles) per model sequence under the current policy, exact over the
    enumerated rollouts (`sm_dist.eval.arith_eval.count_cycles`: a repeat deletes a token already
    written and deleted at the same state, a loop turning once more)."""
    from sm_dist.eval.arith_eval import count_cycles

    full = torch.where(solver.allowed, solver.table, torch.full_like(solver.table, NEG)).detach()
    logp = full.log_softmax(-1)  # finite, so padded entries * 0 stay 0
    pairs = repeats = 0.0
    for k, t in enumerate(solver.m_traces):
        prob = float((logp[solver.m_s[k], solver.m_a[k]] * solver.m_mask[k]).sum().exp())
        n_pairs, n_rep = count_cycles(list(t), BK)
        pairs, repeats = pairs + prob * n_pairs, repeats + prob * n_rep
    return pairs, repeats
