"""Eval metrics of issue 23: <bkspc> precision, write/delete cycles, plausible forced errors."""

from types import SimpleNamespace

import pytest

from sm_dist.data.noise import plausible_candidates
from sm_dist.eval.arith_eval import count_cycles, score_example, summarize
from sm_dist.eval.decoding import plausible_error_prefixes

BK = 99


def test_count_cycles_pairs_and_repeats():
    # write 5, delete, write 5, delete (a repeat at the same state), write 6, eos
    assert count_cycles([1, 5, BK, 5, BK, 6, 2], BK) == (2, 1)
    # two deletions in a row: the second deletes a token written earlier (no pair), no repeat
    assert count_cycles([1, 5, BK, BK, 7], BK) == (1, 0)
    # the same token deleted at a different state is no repeat
    assert count_cycles([5, BK, 1, 5, BK], BK) == (2, 0)
    assert count_cycles([BK, 1], BK) == (0, 0)  # a <bkspc> on the empty stack deletes nothing


def test_bkspc_precision_in_summarize():
    ref = [1, 2, 3]  # answer ids + eos
    right = score_example("q", "a", "a", [1, 7, BK, 2, 3], BK, ref)  # deletes a wrong 7: a fix
    wrong = score_example("q", "a", "b", [1, 2, BK, 2, 3], BK, ref)  # deletes a right 2
    s = summarize([right, wrong])
    assert s["bkspc_fixes"] == 1 and s["num_backspaces"] == 2
    assert s["bkspc_precision"] == pytest.approx(0.5)
    assert s["write_delete_pairs"] == 2 and s["repeat_cycles"] == 0
    assert summarize([score_example("q", "a", "a", [1, 2, 3], BK, ref)])["bkspc_precision"] is None


class _CharTok:
    def __init__(self):
        self.v = {c: i for i, c in enumerate("0123456789abcdef-")}

    def get_vocab(self):
        return self.v


def test_plausible_error_prefixes_are_plausible_mistakes():
    tok = _CharTok()
    qs = [("In base 16, what is 1e5 + f?", "1f4"), ("In base 10, what is 7 - 21?", "-14")] * 20
    ex = [SimpleNamespace(prompt=p, answer=a) for p, a in qs]
    ans = [[tok.v[c] for c in a] for _, a in qs]
    inv = {i: c for c, i in tok.v.items()}
    prefixes = plausible_error_prefixes(ex, ans, tok, seed=0)
    assert prefixes == plausible_error_prefixes(ex, ans, tok, seed=0)  # a seed fixes every prefix
    positions = set()
    for (p, a), pre in zip(qs, prefixes):
        i, w = len(pre) - 1, inv[pre[-1]]
        assert "".join(inv[t] for t in pre[:-1]) == a[:i]  # a correct start
        assert w in plausible_candidates(p, a)[i]  # then one plausible wrong token
        positions.add((a, i))
    assert len(positions) > 3  # not always the same position
