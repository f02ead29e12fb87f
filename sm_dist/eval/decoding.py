"""Decoding modes of `sm-dist eval` and the forced-error prefixes of the recovery measure.

DESIGN §2 "Decoding a backspace model": after a `<bkspc>` the state is the one before the deleted
token, so plain greedy decoding rewrites that token and loops until the backspace cap. Modes:

* `search` (default): temperature 0, `<bkspc>` allowed, a token deleted at a state is never chosen
  again there (`RolloutParams.no_repeat_deleted`): backspace as search. Deterministic.
* `greedy`: temperature 0, `<bkspc>` allowed, no rule (kept for comparison: it loops). Deterministic.
* `greedy_no_bkspc`: temperature 0, `<bkspc>` forbidden: the control. Deterministic.
* `sample`: `temperature` (default 1.0) and `top_p`, `samples` rollouts per question, reproducible
  under `seed`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

DECODINGS = ("search", "greedy", "greedy_no_bkspc", "sample")
DETERMINISTIC = ("search", "greedy", "greedy_no_bkspc")


def resolve_decoding(decoding: str | None) -> str:
    """The decoding mode (None: the default, `search`); ValueError for an unknown one."""
    if decoding is None:
        return "search"
    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r}; use one of {', '.join(DECODINGS)}")
    return decoding


_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "max_actions": "--max-actions",
          "max_backspaces": "--max-backspaces", "samples_per_prompt": "--samples"}  # fmt: skip


def check_ranges(**values) -> None:
    """Eval flags against the ranges of their `rollout.*` keys, which the config holds (once); a
    ValueError names the flag, the value and the range."""
    from pydantic import ValidationError

    from sm_dist.config import RolloutConfig

    probe = RolloutConfig()
    for name, value in values.items():
        try:
            setattr(probe, name, value)
        except ValidationError as e:
            msg = e.errors()[0]["msg"].lower()
            raise ValueError(f"{_FLAGS[name]} {value}: {msg} (the range of rollout.{name})") from None


def decoding_params(
    decoding: str,
    temperature: float | None = None,
    top_p: float = 1.0,
    samples: int = 1,
    seed: int = 0,
    max_actions: int | None = None,
    max_backspaces: int | None = None,
    bkspc_bias: float = 0.0,
):
    """`RolloutParams` for one decoding mode; raises ValueError naming the bad flag and the fix.
    `max_actions` / `max_backspaces` None: rollout.*'s defaults (sm_dist/config/rollout.py)."""
    from sm_dist.config import RolloutConfig
    from sm_dist.rollout.engine import RolloutParams

    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r}; use one of {', '.join(DECODINGS)}")
    caps = RolloutConfig().model_dump(include={"max_actions", "max_backspaces"})
    max_actions = caps["max_actions"] if max_actions is None else max_actions
    max_backspaces = caps["max_backspaces"] if max_backspaces is None else max_backspaces
    check_ranges(
        samples_per_prompt=samples, top_p=top_p, max_actions=max_actions, max_backspaces=max_backspaces
    )
    if temperature is not None:
        check_ranges(temperature=temperature)
    if decoding in DETERMINISTIC:
        if samples > 1:
            raise ValueError(
                f"--samples {samples} with --decoding {decoding} would repeat one deterministic "
                "rollout; use --decoding sample for several samples per question, or --samples 1"
            )
        if temperature not in (None, 0.0) or top_p != 1.0:
            raise ValueError(
                f"--temperature {temperature} / --top-p {top_p} apply to --decoding sample only; "
                f"--decoding {decoding} is temperature 0: drop them or use --decoding sample"
            )
    return RolloutParams(
        temperature=(1.0 if temperature is None else temperature) if decoding == "sample" else 0.0,
        top_p=top_p,
        max_actions=max_actions,
        max_backspaces=max_backspaces,
        samples_per_prompt=samples,
        seed=seed,
        logprobs=False,
        forbid_bkspc=decoding == "greedy_no_bkspc",
        no_repeat_deleted=decoding == "search",
        bkspc_bias=bkspc_bias,
    )


def forced_error_prefixes(answer_ids: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
    """Recovery measure: per answer, `answer[:i] + [w]` with i uniform in [0, len(answer)) and a wrong
    token w != answer[i] drawn uniformly from the tokens that occur in any answer of the set.

    One `random.Random(seed)` draws (i, w) for each answer in order, so a seed fixes every prefix.
    """
    alphabet = sorted({int(t) for ans in answer_ids for t in ans})
    rng = random.Random(seed)
    prefixes = []
    for q, ans in enumerate(answer_ids):
        if not ans:
            raise ValueError(f"answer {q} tokenises to nothing; --force-error needs non-empty answers")
        i = rng.randrange(len(ans))
        wrong = [t for t in alphabet if t != ans[i]]
        if not wrong:
            raise ValueError(
                f"every answer uses only token {ans[i]}; --force-error needs at least two distinct "
                "answer tokens to draw a wrong one from"
            )
        prefixes.append([int(t) for t in ans[:i]] + [rng.choice(wrong)])
    return prefixes


def plausible_error_prefixes(
    examples, answer_ids: Sequence[Sequence[int]], tok, seed: int
) -> list[list[int]]:
    """Recovery with a plausible mistake (arithmetic): per question, `answer[:i] + [w]` with i uniform
    over the answer positions (the eos position included) that have a plausible wrong token, w uniform
    among them (`sm_dist.data.noise.plausible_candidates`: a digit +-1, a sign, a carry/borrow slip).

    One `random.Random(seed)` draws (i, w) per question in order. A question without any plausible
    mistake, or whose answer is not one token a character, raises naming it.
    """
    from sm_dist.data.noise import plausible_candidates

    vocab = tok.get_vocab()
    rng = random.Random(seed)
    prefixes = []
    for q, (ex, ans) in enumerate(zip(examples, answer_ids, strict=True)):
        cands = plausible_candidates(ex.prompt, ex.answer.strip())
        if len(cands) != len(ans) + 1:
            raise ValueError(f"question {q}: answer {ex.answer!r} is not one token a character")
        options = [(i, [vocab[c] for c in cs if c in vocab]) for i, cs in enumerate(cands)]
        options = [(i, ws) for i, ws in options if ws]
        if not options:
            raise ValueError(f"question {q} ({ex.prompt!r}) has no plausible wrong token")
        i, ws = rng.choice(options)
        prefixes.append([int(t) for t in ans[:i]] + [rng.choice(ws)])
    return prefixes
