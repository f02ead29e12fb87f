"""The paper's arithmetic task: DeepMind `mathematics_dataset` `add_or_sub_in_base`, regenerated here.

The reference generator needs sympy 1.5 and cannot share an environment with torch (PLATFORM.md), so
this module reproduces its format and its sampling scheme (`arithmetic.add_or_sub_in_base`):

    entropy ~ U(difficulty range)           train-easy (3, 16/3), -medium (16/3, 23/3), -hard (23/3, 10)
    e_p = max(1, U(0, entropy)); e_q = max(1, entropy - e_p)
    p, q ~ uniform integers in [-ceil(10**e / 2), ceil(10**e / 2)]   (signed `number.integer`)
    base ~ randint(2, 16); op ~ {+, -}
    "In base {base}, what is {p} {op} {q}?"  →  answer p op q, all in base `base`

Numerals use lowercase digits 0-9a-f, a leading "-" for negatives, no leading zeros ("0" for zero);
the shared train files (60k lines) match this exactly (tests/unit/test_arith.py checks every line).
The RNG stream is Python's `random`, not DeepMind's, so values differ; the distributions match.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Collection, Iterable

MODULE = "add_or_sub_in_base"
DIGITS = "0123456789abcdef"
MIN_BASE, MAX_BASE = 2, 16
# Entropy ranges of the train difficulty levels: (3, 10) split in thirds (mathematics_dataset/generate.py).
DIFFICULTY_ENTROPY = {"easy": (3.0, 16 / 3), "medium": (16 / 3, 23 / 3), "hard": (23 / 3, 10.0)}
_QUESTION = re.compile(r"In base (\d+), what is (-?[0-9a-f]+) ([+-]) (-?[0-9a-f]+)\?")


def to_base(n: int, base: int) -> str:
    """`n` as a base-`base` numeral: lowercase digits, "-" for negatives, no leading zeros."""
    _check_base(base)
    if n == 0:
        return "0"
    digits = []
    m = abs(n)
    while m:
        m, r = divmod(m, base)
        digits.append(DIGITS[r])
    return ("-" if n < 0 else "") + "".join(reversed(digits))


def parse_base_numeral(s: str, base: int) -> int | None:
    """The value of numeral `s` in `base`, or None if `s` is not one (wrong digit, case, spaces, empty).

    Accepts what a reader would: an optional "-", then digits valid in `base` (leading zeros allowed).
    """
    _check_base(base)
    if not isinstance(s, str):
        return None
    body = s[1:] if s.startswith("-") else s
    if not body or any(c not in DIGITS[:base] for c in body):
        return None
    return int(s, base)


def is_valid_numeral(s: str, base: int) -> bool:
    """Whether `s` is a well-formed base-`base` numeral (for the malformed-answer rate)."""
    return parse_base_numeral(s, base) is not None


def parse_question(prompt: str) -> tuple[int, int, str, int]:
    """Parse "In base B, what is A op C?" into (B, A, op, C); raise ValueError quoting the prompt."""
    m = _QUESTION.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(
            f"not an add_or_sub_in_base question: {prompt!r} (expected 'In base B, what is A + C?')"
        )
    base = int(m[1])
    if not MIN_BASE <= base <= MAX_BASE:
        raise ValueError(f"base {base} in {prompt!r} is outside [{MIN_BASE}, {MAX_BASE}]")
    a, b = parse_base_numeral(m[2], base), parse_base_numeral(m[4], base)
    if a is None or b is None:
        raise ValueError(
            f"operand {m[2] if a is None else m[4]!r} in {prompt!r} is not a base-{base} numeral"
        )
    return base, a, m[3], b


def solve(prompt: str) -> str:
    """The canonical answer to `prompt`."""
    base, a, op, b = parse_question(prompt)
    return to_base(a + b if op == "+" else a - b, base)


def check_answer(prompt: str, answer: str) -> bool:
    """Whether `answer` (surrounding whitespace ignored) is exactly the canonical answer.

    Exact match, as DeepMind's evaluation: "007" for "7" is wrong even though its value is right.
    """
    return isinstance(answer, str) and answer.strip() == solve(prompt)


def _signed_integer(entropy: float, rng: random.Random) -> int:
    """mathematics_dataset `number.integer(entropy, signed=True)`: uniform on [-m, m], m = ceil(10**e / 2)."""
    max_ = int(math.ceil(math.pow(10, entropy) / 2))
    return rng.randint(-max_, max_)


def sample_question(difficulty: str, rng: random.Random) -> dict:
    """One {"prompt", "answer", "module"} example drawn as the reference generator does (module docstring)."""
    if difficulty not in DIFFICULTY_ENTROPY:
        raise ValueError(f"difficulty={difficulty!r}; choose one of {sorted(DIFFICULTY_ENTROPY)}")
    entropy = rng.uniform(*DIFFICULTY_ENTROPY[difficulty])
    e_p = max(1.0, rng.uniform(0, entropy))
    e_q = max(1.0, entropy - e_p)
    p, q = _signed_integer(e_p, rng), _signed_integer(e_q, rng)
    base = rng.randint(MIN_BASE, MAX_BASE)
    op = rng.choice("+-")
    answer = p + q if op == "+" else p - q
    prompt = f"In base {base}, what is {to_base(p, base)} {op} {to_base(q, base)}?"
    return {"prompt": prompt, "answer": to_base(answer, base), "module": MODULE}


def generate(
    n: int, difficulty: str, seed: int, exclude: Iterable[str] = (), bases: Collection[int] | None = None
) -> list[dict]:
    """`n` distinct questions of `difficulty`, none of whose prompts is in `exclude` (for held-out sets),
    only in `bases` when given (a narrower task; the other draws are discarded).

    Deterministic in `seed`. Raises ValueError if `n` distinct new prompts cannot be found (the easy
    level has a finite pool), naming how many were found.
    """
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[dict] = []
    spread = (MAX_BASE - MIN_BASE + 1) / len(bases) if bases else 1.0  # draws per kept base
    budget = int(
        (20 * n + 1000) * spread
    )  # draws before giving up; duplicates are rare except for tiny pools
    while len(out) < n and budget > 0:
        budget -= 1
        ex = sample_question(difficulty, rng)
        if bases and parse_question(ex["prompt"])[0] not in bases:
            continue
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
    if len(out) < n:
        raise ValueError(
            f"found only {len(out)} of {n} distinct {difficulty!r} questions outside `exclude` "
            f"({len(seen) - len(out)} excluded prompts); ask for fewer or use a harder level"
        )
    return out


def _check_base(base: int) -> None:
    if not MIN_BASE <= base <= MAX_BASE:
        raise ValueError(f"base={base} outside [{MIN_BASE}, {MAX_BASE}] (digits are 0-9a-f)")
