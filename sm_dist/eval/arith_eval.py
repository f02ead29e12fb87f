"""Evaluate a model on (prompt, answer) jsonl data with greedy backspace-aware generation.

Prompts are tokenised exactly as the data pipeline does (`encode_examples`: no special tokens, no
bos); rollouts are greedy (temperature 0) through `BackspaceEngine`, with `<bkspc>` allowed
(backspace on) or forbidden (off). The prediction is the collapsed continuation (`final_ids`) without
eos, decoded with special tokens skipped, compared with the answer by exact match after strip().

Metrics (see `summarize`):
* accuracy: mean per-example exact-match correctness.
* malformed_rate: among prompts that parse as add_or_sub_in_base questions, the fraction of
  predictions that are not a valid numeral in the question's base; None if no prompt parses.
* bkspc_rate: total <bkspc> actions / total actions.
* answers_using_bkspc: fraction of examples whose action trace has at least one <bkspc>.
* bkspc_fixes: number of <bkspc> actions that deleted a *wrong* token. Replaying the trace on a stack
  of generated tokens, a <bkspc> pops the token at continuation position i; it is a fix when the
  reference tokenisation (answer ids + eos, as in `encode_examples`) has no token at i or a different
  one. (A deleted token that matched the reference at its position is not a fix.)
* length statistics: mean/max actions per rollout, mean/max predicted-answer characters.
* per_base: {base: {"n", "accuracy"}} for arithmetic prompts.
* skipped: bad rows skipped while loading (on_bad="skip").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sm_dist.data.arith import is_valid_numeral, parse_question


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
    finish: dict[str, int] = {}
    for r in results:
        finish[r.finish_reason] = finish.get(r.finish_reason, 0) + 1
    return {
        "n": len(results),
        "accuracy": _mean(float(r.correct) for r in results),
        "malformed_rate": _mean(float(r.malformed) for r in arith) if arith else None,
        "bkspc_rate": sum(r.num_backspaces for r in results) / total_actions if total_actions else 0.0,
        "answers_using_bkspc": _mean(float(r.num_backspaces > 0) for r in results),
        "bkspc_fixes": sum(r.bkspc_fixes for r in results),
        "num_backspaces": sum(r.num_backspaces for r in results),
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
    backspace: bool = True,
    limit: int | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    on_bad: str = "error",
    max_actions: int = 64,
    max_backspaces: int = 16,
    batch_size: int = 256,
    engine=None,
    progress: bool = True,
) -> dict:
    """Run the evaluation; returns `summarize(...)` plus "examples" (per-example results as dicts).

    Data is loaded (and bad rows raise or are skipped per `on_bad`) before any engine is built.
    `engine`: an existing `BackspaceEngine` on `model_dir` to reuse (one vLLM engine per process).
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.data.datasets import load_examples
    from sm_dist.rollout.engine import RolloutParams

    examples, report = load_examples(
        data, prompt_field=prompt_field, answer_field=answer_field, on_bad=on_bad, limit=limit
    )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    bkspc_id = get_bkspc_id(tok)
    eos_id = int(tok.eos_token_id)
    if engine is None:
        from sm_dist.rollout.engine import BackspaceEngine

        engine = BackspaceEngine(model_dir, worker_extension_cls=None)
    params = RolloutParams(
        temperature=0.0,
        max_actions=max_actions,
        max_backspaces=max_backspaces,
        forbid_bkspc=not backspace,
        logprobs=False,
    )
    # Same tokenisation as sm_dist.data.datasets.encode_examples: no special tokens (no bos).
    prompt_ids = [tok.encode(ex.prompt, add_special_tokens=False) for ex in examples]
    results: list[ExampleResult] = []
    starts = range(0, len(examples), batch_size)
    for s in tqdm(starts, desc="eval", unit="batch", disable=not progress):
        rollouts = engine.generate(prompt_ids[s : s + batch_size], params)
        for ex, ro in zip(examples[s : s + batch_size], rollouts, strict=True):
            final = [t for t in ro.final_ids if t != eos_id]
            pred = tok.decode(final, skip_special_tokens=True)
            ref = [*tok.encode(ex.answer, add_special_tokens=False), eos_id]
            results.append(
                score_example(ex.prompt, ex.answer, pred, ro.action_ids, bkspc_id, ref, ro.finish_reason)
            )
    summary = summarize(results, skipped=sum(report.skipped.values()))
    summary["skipped_by_reason"] = dict(report.skipped)
    summary["backspace"] = "on" if backspace else "off"
    summary["model"] = str(model_dir)
    summary["data"] = str(data)
    summary["examples"] = [asdict(r) for r in results]
    return summary
