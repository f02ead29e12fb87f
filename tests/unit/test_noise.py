"""data.noise = plausible | model (sm_dist.data.noise): candidates, augmentation, the encode_rows path."""

import json
from types import SimpleNamespace

import pytest

from sm_dist.core.traces import collapse
from sm_dist.data.arith import generate, solve
from sm_dist.data.datasets import EncodedExample
from sm_dist.data.noise import (
    augment_with_candidates,
    load_model_noise,
    plausible_candidates,
    slip_answers,
    top_k_candidates,
)


def test_plausible_candidates_of_1f4_in_base_16():
    # 1e5 + f = 1f4 (base 16): 5 + f = 14 carries once, out of column 0
    prompt = "In base 16, what is 1e5 + f?"
    assert solve(prompt) == "1f4"
    assert slip_answers(prompt) == ["1e4"]  # the carry into column 1 ignored: 1f4 - 0x10
    c = plausible_candidates(prompt, "1f4")
    assert c[0] == ["-", "0", "2"]  # digit neighbours of 1, and a sign added
    assert c[1] == ["e"]  # f - 1 (no f + 1 in base 16); the slip's digit too
    assert c[2] == ["3", "5"]
    assert c[3] == []  # eos position: no slip writes more digits here


def test_sign_dropped_and_borrow_slip():
    # 7 - 21 = -14 (base 10): magnitude 21 - 7 borrows into column 1 -> slip -(21 - 7 + 10) = -24
    prompt = "In base 10, what is 7 - 21?"
    assert solve(prompt) == "-14"
    assert slip_answers(prompt) == ["-24"]
    assert slip_answers("In base 10, what is 3 - 15?") == []  # 15 - 3: no borrow
    c = plausible_candidates(prompt, "-14")
    assert c[0] == ["1"]  # the sign dropped: the first digit at position 0
    assert c[1] == ["0", "2"]  # neighbours of 1; the slip leaves the answer here too (its 2)
    assert c[2] == ["3", "5"]


def test_carry_slip_that_drops_a_digit_and_one_that_adds_none():
    # 99 + 1 = 100: carries out of columns 0 and 1 -> slips 100 - 10 = 90, 100 - 100 = 0
    prompt = "In base 10, what is 99 + 1?"
    assert slip_answers(prompt) == ["0", "90"]
    c = plausible_candidates(prompt, "100")
    assert "9" in c[0] and "0" in c[0]  # 90 and 0 both leave at position 0 (0 and 2 are neighbours too)
    # no carry at all: no slip
    assert slip_answers("In base 10, what is 12 + 3?") == []


@pytest.mark.parametrize("seed", range(3))
def test_slips_differ_from_the_answer_by_a_power_of_the_base(seed):
    for q in generate(200, "easy", seed):
        base = int(q["prompt"].split()[2].rstrip(","))
        true = int(q["answer"], base)
        for s in slip_answers(q["prompt"]):
            d = abs(int(s, base) - true)
            k = 1
            while k < d:
                k *= base
            assert k == d and d >= base, (q, s)
        for i, cs in enumerate(plausible_candidates(q["prompt"], q["answer"])):
            if i < len(q["answer"]):
                assert q["answer"][i] not in cs, (q, i, cs)


def _enc(prompt, target):
    return EncodedExample(prompt_ids=prompt, target_ids=target)


def test_augment_with_candidates_draws_only_candidates_and_collapses():
    enc = [_enc([1, 2], [10, 11, 12, 3])] * 200
    cands = [[[20, 21], [], [10, 12, 22], []]] * 200  # 12 (the true token) at position 2 is never drawn
    aug = augment_with_candidates(enc, 99, 0.5, cands, seed=0)
    seen = {i: set() for i in range(4)}
    for a in aug:
        assert collapse([*a.prompt_ids, *a.action_ids], 99, prompt_len=2)[2:] == a.target_ids
        pos = 0
        for k, (t, n) in enumerate(zip(a.action_ids, a.is_noise)):
            if n:
                seen[pos].add(t)
                assert a.action_ids[k + 1] == 99
            elif t != 99:
                pos += 1
    assert seen == {0: {20, 21}, 1: set(), 2: {10, 22}, 3: set()}
    rate = sum(sum(a.is_noise) for a in aug) / (2 * len(aug))
    assert 0.4 < rate < 0.6  # p_noise on the positions that have candidates


class _LP:
    def __init__(self, lp):
        self.logprob = lp


def test_top_k_excludes_the_expert_token_and_banned():
    seq = [5, 6, 7, 8]  # prompt [5, 6], targets 7, 8
    plp = [None, {6: _LP(-0.1)}, {7: _LP(-1.0), 9: _LP(-0.5), 4: _LP(-0.7), 11: _LP(-2.0)}, {8: _LP(-0.2)}]
    out = top_k_candidates(plp, seq, 2, k=2, banned={4})
    assert out == [[9, 11], []]


def test_load_model_noise_matches_by_ids_and_names_a_missing_row(tmp_path):
    p = tmp_path / "noise.jsonl"
    p.write_text(json.dumps({"prompt_ids": [1], "target_ids": [2, 3], "candidates": [[4], [5]]}) + "\n")
    assert load_model_noise(p, [_enc([1], [2, 3])]) == [[[4], [5]]]
    with pytest.raises(ValueError, match="no candidates for example 1"):
        load_model_noise(p, [_enc([1], [2, 4])])


def test_config_model_noise_needs_a_path():
    from sm_dist.config import DataConfig

    with pytest.raises(ValueError, match=r"noise\.model\.path"):
        DataConfig(noise={"kind": "model"})
    assert DataConfig(noise={"kind": "plausible"}).noise.kind == "plausible"
    assert DataConfig(noise={"kind": "model", "path": "n.jsonl"}).noise.path == "n.jsonl"


def test_encode_rows_with_plausible_noise(tiny_model_dir):
    """The train path: arithmetic rows through encode_rows with data.noise.kind=plausible."""
    from transformers import AutoTokenizer

    from sm_dist.config import DataConfig
    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.data.datasets import Example
    from sm_dist.data.prepare import encode_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    qs = generate(50, "easy", 3)
    cfg = SimpleNamespace(
        data=DataConfig(noise={"kind": "plausible"}, p_noise=0.5), run=SimpleNamespace(seed=0)
    )
    rows, enc, _ = encode_rows(cfg, tok, [Example(q["prompt"], q["answer"]) for q in qs], "mem")
    bk = get_bkspc_id(tok)
    n_noise = 0
    for q, r in zip(qs, rows):
        cands = plausible_candidates(q["prompt"], q["answer"])
        pos = 0
        for k, (t, n) in enumerate(zip(r["action_ids"], r["is_noise"])):
            if n:
                n_noise += 1
                assert tok.convert_ids_to_tokens(t) in cands[pos], (q, pos, t)
                assert r["action_ids"][k + 1] == bk
            elif t != bk:
                pos += 1
    assert n_noise > 10


def test_noise_candidates_refuses_a_non_arithmetic_row(tiny_model_dir):
    from transformers import AutoTokenizer

    from sm_dist.config import PlausibleNoise
    from sm_dist.data.noise import noise_candidates

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = [
        _enc(
            tok.encode("what is 1 + 1?", add_special_tokens=False),
            [*tok.encode("2", add_special_tokens=False), tok.eos_token_id],
        )
    ]
    with pytest.raises(ValueError, match="data.noise.kind=plausible is for add_or_sub_in_base"):
        noise_candidates(PlausibleNoise(), enc, tok)
