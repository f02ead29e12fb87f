"""Which wrong token goes before a true token in the paper's augmentation (DESIGN §2), by `data.noise`.

    task, vocab  uniform over the answers' tokens / the whole vocabulary (`datasets.augment`)
    plausible    add_or_sub_in_base only: the mistakes a model makes on this task, given a correct
                 prefix of the answer (below)
    model        any data: the base model's own top-k tokens at that state, the expert token excluded,
                 from one vLLM prompt-log-prob pass over the expert sequences (`write_model_noise`,
                 `python -m sm_dist.data.noise`), read back from `data.noise.path`

Both new kinds give each answer position i (the eos position included) a list of *candidates*; with
probability p_noise a uniform draw among them is inserted before the true token, then `<bkspc>`
(`augment_with_candidates`). A position with no candidate gets no noise, so the realised rate can be
below p_noise (the plausible kind has none at most eos positions). Noise actions are flagged as
before (`is_noise`), and masked by the objective (`objective.mask_noise_actions`).

Plausible mistakes at position i of the answer `ans` (a correct prefix ans[:i] already written):
  * digit neighbour: the true digit d replaced by d - 1 or d + 1, kept inside the base (no wrap);
  * sign: at position 0, "-" where the answer is non-negative (a sign added), or the first digit where
    it is negative (the sign dropped);
  * carry/borrow slip: the answer of the same question computed with one carry or borrow ignored.
    The signed sum is reduced to one magnitude operation: |x| + |y| when the operands (after folding
    the operator into the second one) share a sign, else max - min, with the sign of the larger.
    Ignoring the carry out of column k of an addition lowers the magnitude by base^(k+1); ignoring the
    borrow into column k+1 of a subtraction raises it by base^(k+1). Each column with a carry (borrow)
    gives one slip answer; its candidate is its character at the first position where it leaves the
    true answer (the eos position when the slip only adds digits; none when it only drops them).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sm_dist.data.arith import DIGITS, parse_question, to_base

if TYPE_CHECKING:  # datasets imports pyarrow, which the GPU machine lacks (benchmarks/arith_gpu.py)
    from sm_dist.config import ModelNoise, PlausibleNoise
    from sm_dist.data.datasets import AugmentedExample, EncodedExample

# The `data.noise.kind` values (sm_dist/config/data.py mirrors them; tests/unit/test_config_registries.py
# compares): uniform draws over a token set (`datasets.augment`), or per-position candidates.
UNIFORM_KINDS = ("task", "vocab")
CANDIDATE_KINDS = ("plausible", "model")
KINDS = UNIFORM_KINDS + CANDIDATE_KINDS

EOS_POSITION = None  # marker of the eos position in `plausible_candidates` (one past the answer)


def _columns(x: int, base: int) -> list[int]:
    """Digits of x >= 0, least significant first."""
    out = []
    while x:
        x, r = divmod(x, base)
        out.append(r)
    return out or [0]


def slip_answers(prompt: str) -> list[str]:
    """The answers to `prompt` with one carry or borrow ignored (module docstring), distinct and
    different from the true answer; [] when the sum has no carry or borrow."""
    base, a, op, b = parse_question(prompt)
    b = b if op == "+" else -b
    true = a + b
    if (a >= 0) == (b >= 0) or a == 0 or b == 0:
        big, small, add, sign = abs(a), abs(b), True, -1 if (a < 0 or b < 0) else 1
    else:
        big, small = max(abs(a), abs(b)), min(abs(a), abs(b))
        add, sign = False, 1 if true > 0 else -1
    xs, ys = _columns(big, base), _columns(small, base)
    ys += [0] * (len(xs) - len(ys))
    xs += [0] * (len(ys) - len(xs))
    slips, carry = set(), 0
    for k, (x, y) in enumerate(zip(xs, ys)):
        if add:
            carry = int(x + y + carry >= base)
            if carry:
                slips.add(sign * (big + small - base ** (k + 1)))
        else:
            carry = int(x - y - carry < 0)  # a borrow from column k+1
            if carry:
                slips.add(sign * (big - small + base ** (k + 1)))
    return sorted({to_base(s, base) for s in slips} - {to_base(true, base)})


def plausible_candidates(prompt: str, answer: str) -> list[list[str]]:
    """Per answer position (len(answer) + 1 of them, the last the eos position): the plausible wrong
    characters a model could write there after the correct prefix answer[:i] (module docstring)."""
    base = parse_question(prompt)[0]
    digits = DIGITS[:base]
    out: list[set[str]] = [set() for _ in range(len(answer) + 1)]
    for i, ch in enumerate(answer):
        if ch in digits:
            d = digits.index(ch)
            out[i] |= {digits[j] for j in (d - 1, d + 1) if 0 <= j < base}
    if answer.startswith("-"):
        out[0].add(answer[1])  # the sign dropped: the first digit written at once
    else:
        out[0].add("-")  # a sign added
    for s in slip_answers(prompt):
        i = next((k for k in range(min(len(s), len(answer))) if s[k] != answer[k]), None)
        if i is not None:
            out[i].add(s[i])
        elif len(s) > len(answer):
            out[len(answer)].add(s[len(answer)])  # the slip writes more digits: instead of eos
    return [sorted(c - ({answer[i]} if i < len(answer) else set())) for i, c in enumerate(out)]


def plausible_candidate_ids(enc: Sequence[EncodedExample], tok) -> list[list[list[int]]]:
    """Token-id candidates per target position of each encoded arithmetic example; a character that
    is not one token of `tok` is left out (the project's char-level tokenizer has them all)."""
    vocab = tok.get_vocab()
    out = []
    for e in enc:
        prompt = tok.decode(e.prompt_ids, skip_special_tokens=True)
        answer = tok.decode(e.target_ids[:-1], skip_special_tokens=True)
        try:
            cands = plausible_candidates(prompt, answer)
        except ValueError as err:
            raise ValueError(
                f"data.noise.kind=plausible is for add_or_sub_in_base questions; {err}. Use data.noise={{kind: model, "
                "path: FILE} (any data) or task"
            ) from None
        if len(cands) != len(e.target_ids):
            raise ValueError(
                f"data.noise.kind=plausible needs one token per answer character; {answer!r} is "
                f"{len(e.target_ids) - 1} tokens (use data.noise={{kind: model, path: FILE}} with this tokenizer)"
            )
        out.append([[vocab[c] for c in cs if c in vocab] for cs in cands])
    return out


def augment_with_candidates(
    encoded: Sequence[EncodedExample],
    bkspc_id: int,
    p_noise: float,
    candidates: Sequence[Sequence[Sequence[int]]],
    seed: int,
) -> list[AugmentedExample]:
    """Insert `noise, <bkspc>` before target token i with probability `p_noise` where candidates[i] is
    non-empty, the noise token drawn uniformly from them (never the true token). Deterministic in
    `seed`; collapse(action_ids) == target_ids."""
    from sm_dist.data.datasets import AugmentedExample

    if not 0.0 <= p_noise <= 1.0:
        raise ValueError(f"p_noise={p_noise} must be in [0, 1]")
    rng = random.Random(seed)
    out = []
    for ex, cands in zip(encoded, candidates, strict=True):
        actions, is_noise = candidate_noise(ex.target_ids, bkspc_id, p_noise, cands, rng)
        out.append(AugmentedExample(ex.prompt_ids, ex.target_ids, actions, is_noise))
    return out


def candidate_noise(
    target_ids: Sequence[int],
    bkspc_id: int,
    p_noise: float,
    cands: Sequence[Sequence[int]],
    rng: random.Random,
) -> tuple[list[int], list[bool]]:
    """One example of `augment_with_candidates`: (action_ids, is_noise)."""
    actions: list[int] = []
    is_noise: list[bool] = []
    for t, cs in zip(target_ids, cands, strict=True):
        cs = [c for c in cs if c != t and c != bkspc_id]
        if cs and p_noise > 0 and rng.random() < p_noise:
            actions += [int(rng.choice(cs)), bkspc_id]
            is_noise += [True, False]
        actions.append(int(t))
        is_noise.append(False)
    return actions, is_noise


# ---- model noise: the base model's own top-k -------------------------------------------------------


def top_k_candidates(
    prompt_logprobs: Sequence[dict | None], seq: Sequence[int], n_prompt: int, k: int, banned: set[int]
) -> list[list[int]]:
    """From vLLM's prompt log-probs of `seq` (entry i: {token: Logprob} of token i given seq[:i], the
    top-k plus seq[i] itself), the k most likely tokens at each target position other than the
    expert token seq[i] and `banned` (specials, <bkspc>), most likely first."""
    out = []
    for i in range(n_prompt, len(seq)):
        ranked = sorted(prompt_logprobs[i].items(), key=lambda kv: -kv[1].logprob)
        out.append([int(t) for t, _ in ranked if t != seq[i] and t not in banned][:k])
    return out


def write_model_noise(model_dir: str | Path, enc: Sequence[EncodedExample], out: str | Path, k: int) -> Path:
    """One vLLM pass over the expert sequences (prompt + target, eos included): each target position's
    top-k tokens under the model, the expert token excluded, to `out` (jsonl of prompt_ids,
    target_ids, candidates), read back by `load_model_noise`."""
    from vllm import SamplingParams

    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.rollout.engine import BackspaceEngine

    engine = BackspaceEngine(model_dir, worker_extension_cls=None, enable_prefix_caching=False)
    tok = engine.llm.get_tokenizer()
    banned = set(tok.all_special_ids) | {get_bkspc_id(tok)}  # eos too: a terminal action cannot be deleted
    seqs = [[*e.prompt_ids, *e.target_ids] for e in enc]
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k + 1, detokenize=False)
    outs = engine.llm.generate([{"prompt_token_ids": s} for s in seqs], sp, use_tqdm=False)
    out = Path(out)
    with out.open("w") as f:
        for e, s, o in zip(enc, seqs, outs, strict=True):
            cands = top_k_candidates(o.prompt_logprobs, s, len(e.prompt_ids), k, banned)
            row = {"prompt_ids": e.prompt_ids, "target_ids": e.target_ids, "candidates": cands}
            f.write(json.dumps(row) + "\n")
    return out


def load_model_noise(path: str | Path, enc: Sequence[EncodedExample]) -> list[list[list[int]]]:
    """The candidates `write_model_noise` wrote, matched to `enc` by token ids; an example missing from
    the file raises, naming the fix."""
    table = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        table[(tuple(r["prompt_ids"]), tuple(r["target_ids"]))] = r["candidates"]
    out = []
    for i, e in enumerate(enc):
        key = (tuple(e.prompt_ids), tuple(e.target_ids))
        if key not in table:
            raise ValueError(
                f"data.noise.path {path} has no candidates for example {i + 1} ({len(table)} rows in it); "
                "rewrite it for this data and tokenizer: python -m sm_dist.data.noise --model M --data F --out P"
            )
        out.append(table[key])
    return out


def noise_candidates(noise: PlausibleNoise | ModelNoise, enc: Sequence[EncodedExample], tok):
    """Candidates of `data.noise` (kind plausible, or model with its path) for each encoded example."""
    if noise.kind == "model":
        return load_model_noise(noise.path, enc)
    return plausible_candidate_ids(enc, tok)


def main(argv=None) -> None:
    import argparse

    from transformers import AutoTokenizer

    from sm_dist.data.datasets import encode_examples, load_examples

    ap = argparse.ArgumentParser(description="write data.noise.kind=model candidates (one vLLM pass)")
    ap.add_argument("--model", required=True, help="the base model (HF folder with <bkspc>)")
    ap.add_argument("--data", required=True, help="the expert data (prompt/answer rows)")
    ap.add_argument("--out", required=True, help="the candidates file (data.noise.path)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-prompt-len", type=int, default=64)
    ap.add_argument("--max-answer-len", type=int, default=32)
    a = ap.parse_args(argv)
    ex, _ = load_examples(a.data, on_bad="skip")
    tok = AutoTokenizer.from_pretrained(a.model)
    enc, _ = encode_examples(ex, tok, a.max_prompt_len, a.max_answer_len, on_overlong="skip")
    print(write_model_noise(a.model, enc, a.out, a.top_k))


if __name__ == "__main__":
    main()
