"""Evaluate a model on (prompt, answer) jsonl data with backspace-aware generation.

Prompts are tokenised exactly as the data pipeline does (`encode_examples`: no special tokens, no
bos); rollouts go through `BackspaceEngine` with one of the decodings of `sm_dist.eval.decoding`:
`search` (default: temperature 0, a token deleted at a state is never re-chosen there), `greedy`
(temperature 0, loops after a <bkspc>), `greedy_no_bkspc` (the control) or `sample` (temperature,
top-p, K samples per question, reproducible under a seed). The prediction is the collapsed
continuation (`final_ids`) without eos, decoded with special tokens skipped, compared with the answer
by exact match after strip().

Recovery measure (`force_error`): every rollout starts with a forced prefix `answer[:i] + [w]`, a
correct start then one wrong token; only a model that deletes w can still be right. The prefix is part
of the action trace, so deleting w counts as a bkspc fix. `force_error_kind`: "uniform" (w from the
answers' tokens, `forced_error_prefixes`) or "plausible" (arithmetic: w a plausible mistake at i, a
digit +-1, a sign, a carry/borrow slip, `plausible_error_prefixes`).

Metrics (see `summarize`), over all samples of all questions unless said otherwise:
* accuracy: mean exact-match correctness over samples (per-question accuracy when K = 1).
* pass_at_k (with k, the samples per question): fraction of questions with at least one correct
  sample; questions: their number (n counts samples).
* malformed_rate: among prompts that parse as add_or_sub_in_base questions, the fraction of
  predictions that are not a valid numeral in the question's base; None if no prompt parses.
* bkspc_cap_hits: samples stopped by the backspace cap (finish_reason "action_cap": one more
  <bkspc> than max_backspaces), e.g. a greedy write/delete loop.
* length_cap_hits: samples stopped by the length cap (finish_reason "length": max_actions actions,
  or the engine's context), e.g. an answer that never ends. Counted apart from bkspc_cap_hits.
* bkspc_rate: total <bkspc> actions / total actions.
* answers_using_bkspc: fraction of examples whose action trace has at least one <bkspc>.
* bkspc_fixes: number of <bkspc> actions that deleted a *wrong* token. Replaying the trace on a stack
  of generated tokens, a <bkspc> pops the token at continuation position i; it is a fix when the
  reference tokenisation (answer ids + eos, as in `encode_examples`) has no token at i or a different
  one. (A deleted token that matched the reference at its position is not a fix.)
* bkspc_precision: bkspc_fixes / num_backspaces (None without backspaces): how many deletions
  removed a wrong token.
* write_delete_pairs: (write x, <bkspc>) pairs, a token deleted right after it was written;
  repeat_cycles: deletions of a token that had already been written and deleted at the same state (the
  same stack): a write/delete loop turning once more. Both summed over samples.
* length statistics: mean/max actions per rollout, mean/max predicted-answer characters.
* per_base: {base: {"n", "accuracy"}} for arithmetic prompts.
* skipped: bad rows skipped while loading (on_bad="skip").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sm_dist.data.arith import is_valid_numeral, parse_question
from sm_dist.errors import UserError


@dataclass
class ExampleResult:
    prompt: str
    answer: str
    prediction: str
    correct: bool
    base: int | None  # None when the prompt is not an arithmetic question
    malformed: bool | None  # None when base is None
    num_actions: int
    num_backspaces: int
    bkspc_fixes: int
    finish_reason: str
    question_index: int | None = None  # samples of one question share it; None = its own question
    sample_index: int = 0
    forced_prefix: str = ""  # decoded forced prefix (force_error), "" if none
    write_delete_pairs: int = 0
    repeat_cycles: int = 0


def count_cycles(action_ids: Sequence[int], bkspc_id: int) -> tuple[int, int]:
    """(write_delete_pairs, repeat_cycles) of a continuation (module docstring)."""
    stack: list[int] = []
    deleted: set[tuple[int, ...]] = set()  # stack + the token deleted from it
    pairs = repeats = 0
    prev = None
    for a in action_ids:
        if a == bkspc_id:
            if stack:
                pairs += prev is not None and prev != bkspc_id
                key = tuple(stack)
                repeats += key in deleted
                deleted.add(key)
                stack.pop()
        else:
            stack.append(int(a))
        prev = a
    return pairs, repeats


def count_bkspc_fixes(action_ids: Sequence[int], bkspc_id: int, ref_ids: Sequence[int]) -> int:
    """Backspaces that deleted a token differing from `ref_ids` at its position (module docstring).

    `action_ids` is the continuation only (no prompt); a <bkspc> on an empty stack is a no-op.
    """
    stack: list[int] = []
    fixes = 0
    for a in action_ids:
        if a == bkspc_id:
            if stack:
                i = len(stack) - 1
                tok = stack.pop()
                if i >= len(ref_ids) or ref_ids[i] != tok:
                    fixes += 1
        else:
            stack.append(int(a))
    return fixes


def score_example(
    prompt: str,
    answer: str,
    prediction: str,
    action_ids: Sequence[int],
    bkspc_id: int,
    ref_ids: Sequence[int],
    finish_reason: str = "eos",
) -> ExampleResult:
    """Score one rollout: exact match after strip, numeral validity, backspace counts."""
    pred = prediction.strip()
    try:
        base = parse_question(prompt)[0]
    except ValueError:
        base = None
    pairs, repeats = count_cycles(action_ids, bkspc_id)
    return ExampleResult(
        prompt=prompt,
        answer=answer,
        prediction=pred,
        correct=pred == answer.strip(),
        base=base,
        malformed=None if base is None else not is_valid_numeral(pred, base),
        num_actions=len(action_ids),
        num_backspaces=sum(1 for a in action_ids if a == bkspc_id),
        bkspc_fixes=count_bkspc_fixes(action_ids, bkspc_id, ref_ids),
        finish_reason=finish_reason,
        write_delete_pairs=pairs,
        repeat_cycles=repeats,
    )


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(results: Sequence[ExampleResult], skipped: int = 0) -> dict:
    """Aggregate metrics over per-example results (module docstring)."""
    arith = [r for r in results if r.base is not None]
    total_actions = sum(r.num_actions for r in results)
    per_base: dict[str, dict] = {}
    for b in sorted({r.base for r in arith}):
        rs = [r for r in arith if r.base == b]
        per_base[str(b)] = {"n": len(rs), "accuracy": _mean(r.correct for r in rs)}
    n_bk = sum(r.num_backspaces for r in results)
    finish: dict[str, int] = {}
    questions: dict[object, list[bool]] = {}  # question key -> correctness of its samples
    for j, r in enumerate(results):
        finish[r.finish_reason] = finish.get(r.finish_reason, 0) + 1
        key = ("own", j) if r.question_index is None else r.question_index
        questions.setdefault(key, []).append(r.correct)
    return {
        "n": len(results),
        "questions": len(questions),
        "accuracy": _mean(float(r.correct) for r in results),
        "pass_at_k": _mean(float(any(c)) for c in questions.values()),
        "k": max((len(c) for c in questions.values()), default=0),
        "malformed_rate": _mean(float(r.malformed) for r in arith) if arith else None,
        "bkspc_cap_hits": sum(r.finish_reason == "action_cap" for r in results),
        "length_cap_hits": sum(r.finish_reason == "length" for r in results),
        "bkspc_rate": sum(r.num_backspaces for r in results) / total_actions if total_actions else 0.0,
        "answers_using_bkspc": _mean(float(r.num_backspaces > 0) for r in results),
        "bkspc_fixes": sum(r.bkspc_fixes for r in results),
        "num_backspaces": n_bk,
        "bkspc_precision": sum(r.bkspc_fixes for r in results) / n_bk if n_bk else None,
        "write_delete_pairs": sum(r.write_delete_pairs for r in results),
        "repeat_cycles": sum(r.repeat_cycles for r in results),
        "mean_actions": _mean(r.num_actions for r in results),
        "max_actions": max((r.num_actions for r in results), default=0),
        "mean_answer_chars": _mean(len(r.prediction) for r in results),
        "max_answer_chars": max((len(r.prediction) for r in results), default=0),
        "finish_reasons": finish,
        "per_base": per_base,
        "skipped": skipped,
    }


def format_table(summary: dict) -> str:
    """A markdown table of the scalar metrics, then per-base accuracy."""

    def fmt(v):
        if v is None:
            return "n/a"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| metric | value |", "|---|---|"]
    for k, v in summary.items():
        if k in ("per_base", "examples"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={vv}" for kk, vv in v.items())
        lines.append(f"| {k} | {fmt(v)} |")
    if summary.get("per_base"):
        lines += ["", "| base | n | accuracy |", "|---|---|---|"]
        for b, d in summary["per_base"].items():
            lines.append(f"| {b} | {d['n']} | {fmt(d['accuracy'])} |")
    return "\n".join(lines)


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    decoding: str | None = None,
    temperature: float | None = None,
    top_p: float = 1.0,
    samples: int = 1,
    seed: int = 0,
    force_error: bool = False,
    force_error_kind: str = "uniform",
    limit: int | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    on_bad: str = "error",
    max_actions: int | None = None,
    max_backspaces: int | None = None,
    bkspc_bias: float = 0.0,
    batch_size: int = 256,
    engine=None,
    progress: bool = True,
    max_model_len: int | None = None,
) -> dict:
    """Run the evaluation; returns `summarize(...)` plus the decoding, its parameters and "examples"
    (per-sample results as dicts, ordered by (question, sample)). `decoding`: sm_dist.eval.decoding
    (default "search"); `force_error`: the recovery measure, drawn as `force_error_kind` says (module
    docstring). Flags, data (bad rows per `on_bad`; none usable, or limit < 1: a UserError), then prompt
    lengths are checked before any engine is built. `engine`: a `BackspaceEngine` on `model_dir` to
    reuse. `max_actions` / `max_backspaces`: None takes `rollout.*`'s defaults (RolloutConfig);
    `max_model_len`: the engine's context (None: the model's, `sm_dist.eval.target.engine_max_len`).
    """
    from transformers import AutoTokenizer

    if limit is not None and limit < 1:
        raise UserError(f"limit={limit}", "evaluates no example.", "pass limit >= 1, or None for all")
    decoding, params = _decoding(
        decoding, temperature, top_p, samples, seed, max_actions, max_backspaces, bkspc_bias
    )
    examples, report = load_eval_data(data, prompt_field, answer_field, on_bad, limit)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt_ids, answer_ids = _encode(tok, examples)
    prefixes = _forced_prefixes(force_error, force_error_kind, examples, answer_ids, tok, seed)
    engine = _engine(engine, model_dir, max_model_len, prompt_ids, prefixes, data)
    results = _run(engine, tok, examples, prompt_ids, answer_ids, prefixes, params, batch_size, progress)
    return summarize(results, skipped=sum(report.skipped.values())) | {
        "skipped_by_reason": dict(report.skipped),
        **_settings(decoding, params, force_error, force_error_kind, bkspc_bias, model_dir),
        "max_model_len": engine.max_model_len,
        "data": str(data),
        "examples": [asdict(r) for r in results],
    }


def _settings(decoding: str, p, force_error: bool, kind: str, bkspc_bias: float, model_dir) -> dict:
    """The decoding, its parameters and the model, as `evaluate` reports them."""
    return {
        "decoding": decoding, "temperature": p.temperature, "top_p": p.top_p,
        "samples": p.samples_per_prompt, "seed": p.seed, "forced_error": force_error,
        "force_error_kind": kind if force_error else None, "bkspc_bias": bkspc_bias,
        "backspace": "off" if p.forbid_bkspc else "on", "model": str(model_dir),
        "max_actions_cap": p.max_actions, "max_backspaces_cap": p.max_backspaces,
    }  # fmt: skip


def _decoding(decoding, temperature, top_p, samples, seed, max_actions, max_backspaces, bkspc_bias):
    """(the decoding's name, its `RolloutParams`); a None cap takes `rollout.*`'s default."""
    from sm_dist.eval.decoding import decoding_params, resolve_decoding

    decoding = resolve_decoding(decoding)
    params = decoding_params(
        decoding, temperature, top_p, samples, seed, max_actions, max_backspaces, bkspc_bias
    )
    return decoding, params


def load_eval_data(data, prompt_field: str, answer_field: str, on_bad: str, limit: int | None):
    """(examples, load report) of `data`; no usable example is a UserError (before any engine)."""
    from sm_dist.data.datasets import load_examples, no_usable_examples

    examples, report = load_examples(
        data, prompt_field=prompt_field, answer_field=answer_field, on_bad=on_bad, limit=limit
    )
    if not examples:  # before the engine: an empty evaluation is an input error, not "accuracy n/a"
        raise no_usable_examples(f"--data {data}", data, report)
    return examples, report


def _forced_prefixes(force_error: bool, kind: str, examples, answer_ids, tok, seed: int):
    """The recovery measure's forced prefixes, one per question (None without `force_error`)."""
    from sm_dist.eval.decoding import forced_error_prefixes, plausible_error_prefixes

    if kind not in ("uniform", "plausible"):
        raise ValueError(f"force_error_kind={kind!r}; use 'uniform' or 'plausible'")
    if not force_error:
        return None
    if kind == "plausible":
        return plausible_error_prefixes(examples, answer_ids, tok, seed)
    return forced_error_prefixes(answer_ids, seed)


def _engine(engine, model_dir, max_model_len: int | None, prompt_ids, prefixes, data):
    """`engine`, or a new `BackspaceEngine` on `model_dir`, once every prompt (with its forced prefix)
    is known to leave the engine's context room to answer."""
    from sm_dist.eval.target import check_prompt_lengths, engine_max_len

    max_model_len = engine_max_len(model_dir, max_model_len)
    lens = [len(p) + (len(prefixes[i]) if prefixes else 0) for i, p in enumerate(prompt_ids)]
    check_prompt_lengths(lens, max_model_len if engine is None else engine.max_model_len, str(data))
    if engine is None:
        from sm_dist.rollout.engine import BackspaceEngine

        engine = BackspaceEngine(model_dir, worker_extension_cls=None, max_model_len=max_model_len)
    return engine


def _encode(tok, examples) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and answer ids, tokenised as `sm_dist.data.datasets.encode_examples` does (no special
    tokens, no bos; the answer without eos)."""
    prompt_ids = [tok.encode(ex.prompt, add_special_tokens=False) for ex in examples]
    answer_ids = [tok.encode(ex.answer, add_special_tokens=False) for ex in examples]
    return prompt_ids, answer_ids


def _run(engine, tok, examples, prompt_ids, answer_ids, prefixes, params, batch_size, progress):
    """Generate in batches of `batch_size` questions and score every sample."""
    from tqdm import tqdm

    from sm_dist.core.vocab import get_bkspc_id

    bkspc_id, eos_id = get_bkspc_id(tok), int(tok.eos_token_id)
    results: list[ExampleResult] = []
    for s in tqdm(range(0, len(examples), batch_size), desc="eval", unit="batch", disable=not progress):
        batch = slice(s, s + batch_size)
        # index_offset: request seeds depend on the question index, not on the batch split
        rollouts = engine.generate(
            prompt_ids[batch], params, None if prefixes is None else prefixes[batch], index_offset=s
        )
        for ro in rollouts:
            q = s + ro.prompt_index
            ex = examples[q]
            final = [t for t in ro.final_ids if t != eos_id]
            pred = tok.decode(final, skip_special_tokens=True)
            ref = [*answer_ids[q], eos_id]
            r = score_example(ex.prompt, ex.answer, pred, ro.action_ids, bkspc_id, ref, ro.finish_reason)
            r.question_index, r.sample_index = q, ro.sample_index
            if prefixes is not None:
                r.forced_prefix = tok.decode(prefixes[q], skip_special_tokens=True)
            results.append(r)
    return results
