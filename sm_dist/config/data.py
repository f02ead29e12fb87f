"""`data`: the expert (prompt, answer) data, its file format and its noise, each format and each noise
kind a member of a discriminated union with its own parameters (`data.format.kind`, `data.noise.kind`).

The kinds mirror registries that import more than pydantic: `data.format` the readers of
`sm_dist.data.sources.FORMATS` (plus `auto`), `data.noise` the kinds of `sm_dist.data.noise`;
tests/unit/test_config_registries.py checks that they agree, so validating a config imports neither.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from sm_dist.config.base import Section, Variant, by_kind

# ---- data.format --------------------------------------------------------------------------------------


class RecordsFormat(Variant):
    """Files of records (jsonl, parquet, arrow, csv; `auto`: from the suffix, also for `datasets` folders
    and hub datasets): each row's prompt and answer fields, or one plain-text field split in two. Rows
    with `messages` are chat rows (sm_dist.data.chat)."""

    kind: Literal["auto", "jsonl", "parquet", "arrow", "csv"] = Field(
        "auto",
        description="auto: from the suffix (.jsonl/.json, .parquet, .txt/.text, .arrow, .csv); or the format "
        "of every file, whatever its suffix.",
    )
    prompt_field: str = Field("prompt", description="Field holding the prompt text.")
    answer_field: str = Field("answer", description="Field holding the answer text.")
    text_field: str | None = Field(
        None,
        description="Field holding a plain text, split into prompt (its first prompt_chars characters) and "
        "answer; null: use prompt_field/answer_field.",
    )
    prompt_chars: int = Field(
        0, ge=0, description="Plain text: characters that form the prompt (0: empty prompt, all answer)."
    )

    def load_kwargs(self) -> dict[str, Any]:
        """The format's arguments of `sm_dist.data.datasets.load_examples`."""
        fmt = None if self.kind == "auto" else self.kind
        return {"fmt": fmt, **self.model_dump(exclude={"kind"})}


class TextFormat(Variant):
    """Plain-text files: one example per non-blank line, its first prompt_chars characters the prompt."""

    kind: Literal["text"] = Field("text", description="The format.")
    prompt_chars: int = Field(
        0, ge=0, description="Characters that form the prompt (0: empty prompt, all answer)."
    )

    def load_kwargs(self) -> dict[str, Any]:
        return {"fmt": "text", "prompt_chars": self.prompt_chars}


FormatConfig = Annotated[RecordsFormat | TextFormat, Field(discriminator="kind")]

# ---- data.noise ---------------------------------------------------------------------------------------


class TaskNoise(Variant):
    """A wrong token drawn uniformly over the tokens of the answers."""

    kind: Literal["task"] = Field("task", description="The noise.")


class VocabNoise(Variant):
    """A wrong token drawn uniformly over the whole vocabulary."""

    kind: Literal["vocab"] = Field("vocab", description="The noise.")


class PlausibleNoise(Variant):
    """add_or_sub_in_base mistakes: a digit +-1 in the base, a sign added or dropped, a carry/borrow slip."""

    kind: Literal["plausible"] = Field("plausible", description="The noise.")


class ModelNoise(Variant):
    """The base model's own top-k at each expert state (the expert token excluded), read from `path`."""

    kind: Literal["model"] = Field("model", description="The noise.")
    path: str = Field(
        description="The candidates file written by `python -m sm_dist.data.noise --model BASE --data TRAIN "
        "--out FILE` (one vLLM prompt-log-prob pass of the base model over this data).",
    )


NoiseConfig = Annotated[TaskNoise | VocabNoise | PlausibleNoise | ModelNoise, Field(discriminator="kind")]

_FORMAT_FIX = "write it under data.format, e.g. data: {format: {kind: jsonl, %s: ...}} (docs/config.md)"
_MOVED = {
    k: (f"data.{k}", f"data.format.{k}", _FORMAT_FIX % k)
    for k in ("text_field", "prompt_chars", "prompt_field", "answer_field")
}
_MOVED["noise_path"] = (
    "data.noise_path",
    "data.noise.path",
    "data: {noise: {kind: model, path: FILE}} (override: data.noise.path=FILE)",
)


class DataConfig(Section):
    """Expert (prompt, answer) data: loaded, tokenised, noise-augmented, written to the buffer once."""

    moved = _MOVED
    train_path: str = Field(
        "configs/data/arith/add_or_sub_in_base.train-easy.jsonl",
        description="Examples: a jsonl/parquet/text/arrow/csv file, a glob of them (data/*.parquet), a `datasets` "
        "save_to_disk folder, or a hub dataset id (owner/name, from the Hugging Face cache; see data.split, "
        "data.name); read row by row or memory-mapped, never whole. Relative paths: see sm_dist.config.load. "
        "The default is a 5,000-question sample of DeepMind's own add_or_sub_in_base files, bundled in the repo.",
    )
    format: FormatConfig = Field(
        default_factory=RecordsFormat,
        description="File format and its fields, by `kind` (a bare name works too: `format: text`): auto, "
        "jsonl, parquet, arrow, csv (records: prompt/answer fields, or a text_field) or text (plain lines).",
    )
    split: str = Field("train", description="The split of a hub dataset or a save_to_disk DatasetDict.")
    name: str | None = Field(None, description="The configuration (subset) name of a hub dataset.")
    fallback: Literal["arith_easy", "arith_medium", "arith_hard", "none"] = Field(
        "none",
        description="If train_path is missing: 'none' stops with an error naming the fix; arith_<level> "
        "generates that arithmetic split into the run dir (it must match a split named in train_path).",
    )
    fallback_size: int = Field(5000, ge=1, description="Examples generated by the fallback.")
    max_prompt_len: int = Field(64, ge=1, description="Prompt tokens; longer prompts follow `on_bad`.")
    max_answer_len: int = Field(
        32, ge=1, description="Answer tokens including <eos>; longer answers follow `on_bad`."
    )
    on_bad: Literal["error", "skip"] = Field(
        "skip", description="Malformed or over-long rows: raise ('error') or skip and count ('skip')."
    )
    p_noise: float = Field(
        0.1, ge=0.0, le=1.0, description="Per-position probability of a `noise, <bkspc>` pair."
    )
    noise: NoiseConfig = Field(
        default_factory=TaskNoise,
        description="Which wrong token is injected (sm_dist.data.noise), by `kind` (a bare name works too: "
        "`noise: vocab`): task, vocab, plausible, or model (with its `path`).",
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many examples (null: all).")
    augment_copies: int = Field(
        1, ge=1, description="Augmented copies of each example (different noise draws)."
    )
    watch_dir: str | None = Field(
        None,
        description="A folder polled between learner steps for new expert data files (same formats and "
        "checks as train_path); each is added to the expert buffer once (null: off).",
    )
    watch_poll_s: float = Field(1.0, gt=0.0, description="Seconds between two listings of data.watch_dir.")

    _format = by_kind("data.format", FormatConfig)
    _noise = by_kind("data.noise", NoiseConfig)

    def load_kwargs(self) -> dict[str, Any]:
        """Every `load_examples` argument this section sets but the path (and `limit`, which only
        data.train_path takes)."""
        return {**self.format.load_kwargs(), "on_bad": self.on_bad, "split": self.split, "name": self.name}
