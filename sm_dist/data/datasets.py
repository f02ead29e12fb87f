"""Expert data: load (jsonl/parquet/text/arrow/csv files, globs, `datasets` folders and hub ids:
`sm_dist.data.sources`) → encode (token ids) → augment (noise + <bkspc>) → buffer rows.

Chat rows: a row with a `messages` list (role/content dicts, the last an assistant turn) is rendered
with the tokenizer's own chat template: the prompt is `apply_chat_template(messages[:-1],
add_generation_prompt=True)` (ids exactly as the template gives them, BOS included where the template
has it), the answer the last assistant turn's content + eos. A conversation with more than one assistant
turn is a bad row (`multi_assistant`): a row trains one answer (its actions), and the trace has no
per-token roles that would mark earlier assistant turns as actions inside the context; split such a
conversation into one row per assistant turn (each with the turns before it).

Nothing is dropped silently: every skipped row is counted by reason in a report, and with
`on_bad="error"` (the default) the first bad row raises a ValueError naming file, line and reason.

Augmentation (DESIGN §2): `augment` calls `sm_dist.core.traces.augment_noise` on `target_ids`, which end
with eos. Noise may precede *any* true token, eos included: a model can also write a wrong token where it
should stop, and must learn to delete it then.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sm_dist.buffer.schema import DATA_POLICY_VERSION
from sm_dist.core.traces import augment_noise, collapse
from sm_dist.core.vocab import BKSPC_TOKEN
from sm_dist.data.chat import MESSAGES, chat_prompt_ids, split_messages
from sm_dist.data.sources import FORMATS as FORMATS  # data.format kinds (config/data.py)
from sm_dist.data.sources import BadRow, records
from sm_dist.errors import DataError

log = logging.getLogger(__name__)

_FIRST_LINES = 5  # line numbers kept per skip reason
# how to get past a bad row: the config key (sm-dist train) and the flag (eval, text-metrics)
FIX_ROW = "fix the file, or skip and count such rows: data.on_bad=skip (train) or --on-bad skip (eval)."


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    messages: tuple = ()  # chat rows: the turns before the answer, ({"role", "content"}, ...)


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]
    target_ids: list[int]  # answer ids + [eos]


@dataclass(frozen=True)
class AugmentedExample:
    prompt_ids: list[int]
    target_ids: list[int]  # collapse(action_ids) == target_ids
    action_ids: list[int]  # target with `noise, <bkspc>` pairs inserted
    is_noise: list[bool]  # per action: True at the noise tokens


@dataclass
class Report:
    """Counts from one load or encode pass: rows seen, kept, skipped by reason (+ first line numbers)."""

    source: str
    rows_read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_lines: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        lines = self.first_lines.setdefault(reason, [])
        if len(lines) < _FIRST_LINES:
            lines.append(line)

    def summary(self) -> str:
        parts = [f"{r}={n} (lines {self.first_lines[r]})" for r, n in sorted(self.skipped.items())]
        return (
            f"{self.source}: read {self.rows_read}, kept {self.kept}, skipped {sum(self.skipped.values())}"
            + (f": {', '.join(parts)}" if parts else "")
        )


LoadReport = Report
EncodeReport = Report


def no_usable_examples(what: str, path: str | Path, *reports: Report) -> DataError:
    """The error for data that leaves nothing to train or evaluate on, saying why: an empty file, or
    how many rows each kind of bad row took (`reports`: the load report, then the encode report, whose
    numbers are example numbers rather than file lines)."""
    if not reports or reports[0].rows_read == 0:
        return DataError(
            what, f"{path} holds no rows (empty, or blank lines only).", "point it at a file with examples"
        )
    why = ", ".join(
        f"{n} {reason} ({'lines' if i == 0 else 'examples'} {r.first_lines[reason]})"
        for i, r in enumerate(reports)
        for reason, n in r.skipped.most_common()
    )
    skipped = {reason for r in reports for reason in r.skipped}
    fix = "fix those rows, or check data.format.prompt_field / answer_field / text_field"
    if skipped <= {"overlong_prompt", "overlong_answer"}:
        fix = "raise data.max_prompt_len / data.max_answer_len (tokens), or use shorter rows"
    return DataError(
        what, f"no usable examples in {path}: {reports[0].rows_read} rows read, none usable: {why}.", fix
    )


_BadRow = BadRow


# ---- loading -----------------------------------------------------------------------------------------


def load_examples(
    path: str | Path,
    fmt: str | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    text_field: str | None = None,
    prompt_chars: int = 0,
    on_bad: Literal["error", "skip"] = "error",
    limit: int | None = None,
    split: str = "train",
    name: str | None = None,
) -> tuple[list[Example], LoadReport]:
    """Load (prompt, answer) examples from a jsonl, parquet, text, arrow or csv file, a glob of such
    files, a `datasets` save_to_disk folder or a hub dataset id (`split`, config `name`).

    fmt: inferred from the suffix when None (.jsonl/.json, .parquet, .txt/.text, .arrow, .csv).
    text_field (jsonl/parquet) or fmt="text" (one example per non-blank line): plain text, split so the
        first `prompt_chars` characters are the prompt (0: empty prompt, the whole text is the answer).
    on_bad: "error" raises on the first bad row (file, line, reason); "skip" counts it in the report.
        Bad rows: malformed json, a line that is not UTF-8, a non-object row, a missing field, a
        non-string value, an empty answer (or an empty prompt outside text mode, where a prompt is
        expected), the literal text `<bkspc>` in a prompt or answer (`_no_bkspc_text`).
    limit: stop after this many examples are kept.
    Line numbers are 1-based (jsonl/text: file lines; parquet: row index + 1).
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad={on_bad!r}; use 'error' or 'skip'")
    report = Report(source=str(path))
    examples: list[Example] = []
    for line_no, raw, decode in records(str(path), fmt, split, name):
        if limit is not None and len(examples) >= limit:
            break
        report.rows_read += 1
        try:
            record = decode(raw)
            examples.append(_to_example(record, prompt_field, answer_field, text_field, prompt_chars))
            report.kept += 1
        except _BadRow as e:
            if on_bad == "error":
                raise DataError(f"{path}:{line_no}", f"{e.reason}: {e.detail}.", FIX_ROW) from None
            report.skip(e.reason, line_no)
    if report.skipped:
        log.warning("%s", report.summary())
    return examples, report


def _field(record: dict, name: str) -> str:
    if name not in record or record[name] is None:
        raise _BadRow("missing_field", f"no field {name!r} (fields: {sorted(record)})")
    value = record[name]
    if not isinstance(value, str):
        raise _BadRow("non_string", f"field {name!r} is {type(value).__name__} {value!r}, expected a string")
    return value


def _to_example(record, prompt_field, answer_field, text_field, prompt_chars) -> Example:
    if isinstance(record, dict) and MESSAGES in record and text_field is None and prompt_field not in record:
        msgs, answer = split_messages(record[MESSAGES])
        return _no_bkspc_text(Example("".join(t["content"] for t in msgs), answer, msgs))
    if isinstance(record, str) or text_field is not None:
        text = record if isinstance(record, str) else _field(record, text_field)
        prompt, answer = text[:prompt_chars], text[prompt_chars:]
        if not answer:
            raise _BadRow(
                "empty", f"text of {len(text)} chars leaves no answer after prompt_chars={prompt_chars}"
            )
        return _no_bkspc_text(Example(prompt, answer))
    prompt, answer = _field(record, prompt_field), _field(record, answer_field)
    for name, value in ((prompt_field, prompt), (answer_field, answer)):
        if not value.strip():
            raise _BadRow("empty", f"field {name!r} is empty")
    return _no_bkspc_text(Example(prompt, answer))


def _no_bkspc_text(ex: Example) -> Example:
    """The rule for the literal text `<bkspc>` in data: the row is bad (reason `bkspc_text`). The text
    tokenises to the real backspace action, which a prompt must never hold and an answer must not
    teach as a written token; escaping it would silently change the task, so the row is refused."""
    for name, value in (("prompt", ex.prompt), ("answer", ex.answer)):
        if BKSPC_TOKEN in value:
            raise _BadRow(
                "bkspc_text",
                f"the {name} contains the literal text {BKSPC_TOKEN}, the backspace action's token",
            )
    return ex


# ---- tokenisation ------------------------------------------------------------------------------------


def encode_examples(
    examples: Sequence[Example],
    tokenizer,
    max_prompt_len: int,
    max_answer_len: int,
    on_overlong: Literal["error", "skip", "truncate_left"] = "error",
    source: str = "encode_examples",
) -> tuple[list[EncodedExample], EncodeReport]:
    """Tokenise examples (no special tokens added) and append eos to each answer.

    Length policy: `max_answer_len` bounds `target_ids` *including* eos. The answer is never truncated
    (a cut answer teaches the model to stop early). The prompt may be truncated from the left (keeping
    the end, nearest the answer) with on_overlong="truncate_left"; an over-long answer is then skipped
    and counted. With "skip" every over-long example is skipped and counted; with "error" the first one
    raises a DataError naming `source`, the example (1-based) and lengths. Line numbers in the report
    are indices + 1.
    """
    if on_overlong not in ("error", "skip", "truncate_left"):
        raise ValueError(f"on_overlong={on_overlong!r}; use 'error', 'skip' or 'truncate_left'")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos token; set one")
    report = Report(source=source)
    out: list[EncodedExample] = []
    for i, ex in enumerate(examples):
        report.rows_read += 1
        prompt_ids = (
            chat_prompt_ids(tokenizer, ex.messages)
            if ex.messages
            else tokenizer.encode(ex.prompt, add_special_tokens=False)
        )
        target_ids = [*tokenizer.encode(ex.answer, add_special_tokens=False), eos]
        problem = _length_problem(prompt_ids, target_ids, max_prompt_len, max_answer_len, on_overlong)
        if problem is not None:
            if on_overlong == "error":
                key = "data.max_answer_len" if problem[0] == "overlong_answer" else "data.max_prompt_len"
                fix = f"raise {key}, or skip and count such rows: data.on_bad=skip."
                raise DataError(f"{source}: example {i + 1}", f"{problem[1]}.", fix)
            report.skip(problem[0], i + 1)
            continue
        prompt_ids = prompt_ids[-max_prompt_len:] if max_prompt_len else []  # truncate_left keeps the end
        out.append(EncodedExample(prompt_ids=prompt_ids, target_ids=target_ids))
        report.kept += 1
    if report.skipped:
        log.warning("%s", report.summary())
    return out, report


def _length_problem(
    prompt_ids: list[int], target_ids: list[int], max_prompt_len: int, max_answer_len: int, on_overlong: str
) -> tuple[str, str] | None:
    """(reason, detail) when an encoded example breaks the length policy of `encode_examples`."""
    if len(target_ids) > max_answer_len:
        return (
            "overlong_answer",
            f"answer is {len(target_ids)} tokens with eos > max_answer_len={max_answer_len}",
        )
    if len(prompt_ids) > max_prompt_len and on_overlong != "truncate_left":
        return "overlong_prompt", f"prompt is {len(prompt_ids)} tokens > max_prompt_len={max_prompt_len}"
    return None


# ---- augmentation and buffer rows ------------------------------------------------------------------


def augment(
    encoded: Sequence[EncodedExample], bkspc_id: int, p_noise: float, noise_ids: Sequence[int], seed: int
) -> list[AugmentedExample]:
    """Insert `noise, <bkspc>` before each target token with probability `p_noise` (DESIGN §2).

    Noise may precede eos too (module docstring). Deterministic in `seed`; noise tokens always differ
    from the true token they precede (`avoid_true=True`), so each is a real mistake.
    """
    rng = random.Random(seed)
    out = []
    for ex in encoded:
        actions, is_noise = augment_noise(ex.target_ids, bkspc_id, p_noise, noise_ids, rng, avoid_true=True)
        out.append(AugmentedExample(ex.prompt_ids, ex.target_ids, actions, is_noise))
    return out


def make_data_rows(
    augmented: Sequence[AugmentedExample],
    bkspc_id: int,
    worker_id: str = "data",
    id_prefix: str | None = None,
) -> list[dict]:
    """Buffer-schema rows (source="data", policy_version=-1, no log-probs, finish_reason="eos").

    `final_ids` is the collapsed continuation (prompt protected), checked to equal the target.
    sample_id is f"{id_prefix}-{i}" when `id_prefix` is given (deterministic), else a fresh uuid4.
    """
    rows = []
    for i, ex in enumerate(augmented):
        n = len(ex.prompt_ids)
        final = collapse([*ex.prompt_ids, *ex.action_ids], bkspc_id, prompt_len=n)[n:]
        if final != ex.target_ids:
            raise ValueError(f"example {i}: actions collapse to {final}, not the target {ex.target_ids}")
        rows.append(
            {
                "sample_id": f"{id_prefix}-{i}" if id_prefix is not None else uuid.uuid4().hex,
                "prompt_ids": list(ex.prompt_ids),
                "action_ids": list(ex.action_ids),
                "final_ids": final,
                "source": "data",
                "policy_version": DATA_POLICY_VERSION,
                "logprobs": [],
                "finish_reason": "eos",
                "worker_id": worker_id,
                "is_noise": [bool(f) for f in ex.is_noise],  # full length, also when all False
            }
        )
    return rows
