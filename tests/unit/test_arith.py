"""The add_or_sub_in_base generator against DeepMind's own files (PLATFORM.md §Data): the first 5,000
lines of each train split are bundled in configs/data/arith, so these tests need nothing beside the repo."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sm_dist.data.arith import (
    MODULE,
    check_answer,
    generate,
    is_valid_numeral,
    parse_base_numeral,
    parse_question,
    solve,
    to_base,
)

BUNDLED = Path(__file__).resolve().parents[2] / "configs" / "data" / "arith"
LEVELS = ("easy", "medium", "hard")


def _shared(level: str) -> list[dict]:
    path = BUNDLED / f"add_or_sub_in_base.train-{level}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("level", LEVELS)
def test_every_shared_line_parses_and_its_answer_checks(level):
    rows = _shared(level)
    assert len(rows) == 5_000
    for r in rows:
        base, a, op, b = parse_question(r["prompt"])
        assert r["module"] == MODULE
        assert check_answer(r["prompt"], r["answer"]), r
        assert parse_base_numeral(r["answer"], base) == (a + b if op == "+" else a - b)
        assert to_base(a, base) in r["prompt"] and is_valid_numeral(r["answer"], base)


@pytest.mark.parametrize("level", LEVELS)
def test_generated_matches_shared_distribution(level):
    """Same format and, per level, the same prompt/answer length profile (means within 2%)."""
    real, gen = _shared(level)[:5000], generate(5000, level, seed=1)
    for key in ("prompt", "answer"):
        m_real = statistics.mean(len(r[key]) for r in real)
        m_gen = statistics.mean(len(r[key]) for r in gen)
        assert abs(m_gen - m_real) / m_real < 0.02, (key, m_real, m_gen)
    assert {parse_question(r["prompt"])[0] for r in gen} == set(range(2, 17))


@pytest.mark.parametrize("level", LEVELS)
def test_generated_questions_round_trip(level):
    for r in generate(2000, level, seed=7):
        assert set(r) == {"prompt", "answer", "module"}
        base, a, op, b = parse_question(r["prompt"])
        assert r["prompt"] == f"In base {base}, what is {to_base(a, base)} {op} {to_base(b, base)}?"
        assert solve(r["prompt"]) == r["answer"] and check_answer(r["prompt"], r["answer"])


def test_generate_is_deterministic_and_exclude_gives_disjoint_held_out():
    train = generate(3000, "easy", seed=0)
    assert train == generate(3000, "easy", seed=0)
    held_out = generate(3000, "easy", seed=0, exclude={r["prompt"] for r in train})
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert len({r["prompt"] for r in held_out}) == 3000


def test_generate_reports_an_exhausted_pool(monkeypatch):
    import sm_dist.data.arith as arith

    one = {"prompt": "In base 2, what is 1 + 1?", "answer": "10", "module": MODULE}
    monkeypatch.setattr(arith, "sample_question", lambda difficulty, rng: dict(one))
    with pytest.raises(ValueError, match="found only 1 of 2 distinct 'easy' questions"):
        generate(2, "easy", seed=0)


def test_unknown_difficulty_names_the_choices():
    with pytest.raises(ValueError, match="easy"):
        generate(1, "trivial", seed=0)


@given(st.integers(-(10**12), 10**12), st.integers(2, 16))
def test_to_base_round_trips(n, base):
    s = to_base(n, base)
    assert parse_base_numeral(s, base) == n
    assert s == "0" or not s.lstrip("-").startswith("0")


@pytest.mark.parametrize(
    ("s", "base", "value"),
    [("22", 7, 16), ("-a6c", 13, -(10 * 169 + 6 * 13 + 12)), ("007", 8, 7), ("-0", 2, 0), ("f", 16, 15)],
)
def test_parse_base_numeral_accepts(s, base, value):
    assert parse_base_numeral(s, base) == value and is_valid_numeral(s, base)


@pytest.mark.parametrize("s", ["", "-", "12 ", "2", "A", "1-1", "+1", "1.0", " 1"])
def test_malformed_numerals_are_rejected(s):
    assert parse_base_numeral(s, 2) is None and not is_valid_numeral(s, 2)


def test_check_answer_is_exact_match_of_the_canonical_form():
    prompt = "In base 7, what is 25 + -3?"
    assert check_answer(prompt, "22") and check_answer(prompt, " 22\n")
    assert not check_answer(prompt, "022") and not check_answer(prompt, "21") and not check_answer(prompt, "")


def test_parse_question_rejects_other_text():
    with pytest.raises(ValueError, match="not an add_or_sub_in_base question"):
        parse_question("What is 2 + 2?")
    with pytest.raises(ValueError, match="base 17"):
        parse_question("In base 17, what is 1 + 1?")
    with pytest.raises(ValueError, match="not a base-2 numeral"):
        parse_question("In base 2, what is 1 + 3?")


def test_generate_can_narrow_the_bases():
    rows = generate(300, "easy", seed=4, bases={2, 16})
    assert len({r["prompt"] for r in rows}) == 300
    assert {parse_question(r["prompt"])[0] for r in rows} == {2, 16}
    assert generate(50, "easy", seed=4) == generate(50, "easy", seed=4, bases=None)
