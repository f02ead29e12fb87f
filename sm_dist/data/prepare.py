"""Preparing a run's model and expert data from its config (the driver's set-up, before any actor).

`prepare_model` builds the tiny model when asked. `load_train_data` is the one builder of the training
data from `DataConfig`: it reads `data.train_path` once (`load_data`: the one place the config's fields
feed `load_examples`, also for data.watch_dir files) and, given a tokenizer, encodes and length-checks
it, keeping the bad-row reports; preflight validation calls it and hands the result on to the driver's
`build_data`, which noise-augments it into Arrow-ready rows for the expert buffer and the encoded
prompts for the rollout workers. A missing `data.train_path` is generated only with an explicit
`data.fallback`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sm_dist.config import Config, DataConfig

if TYPE_CHECKING:  # the data stack (tokenizers, torch) is imported where it is used
    from sm_dist.data.datasets import EncodedExample, Example, Report

log = logging.getLogger("sm_dist.data")


def prepare_model(cfg: Config) -> None:
    md = Path(cfg.model.dir)
    if md.exists():
        return
    import shutil

    from transformers.utils import logging as hf_logging

    from sm_dist.core.tiny import make_tiny_model

    hf_logging.disable_progress_bar()  # "Writing model shards" of a 2 MB model: console noise
    t = cfg.model.tiny
    tmp = md.with_name(f".{md.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)  # a build cut short before (a full disk): never used
    try:
        if cfg.model.start_from:  # the run's start model is a copy of a given one (the shipped base)
            log.info(f"start model: a copy of {cfg.model.start_from} at {md}")
            shutil.copytree(cfg.model.start_from, tmp)
        else:
            log.info(f"building tiny model at {md}")
            make_tiny_model(
                tmp, hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads, seed=t.seed
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(md)  # whole or absent: a half-written model folder would pass for the run's model


@dataclasses.dataclass(frozen=True)
class TrainData:
    """data.train_path as read once at start-up: the path read (the generated file with data.fallback),
    its examples and load report and, once a tokenizer has encoded them, the encoded examples (length
    filters applied, data.on_bad) and their encode report."""

    path: str
    examples: list[Example]
    loaded: Report
    encoded: list[EncodedExample] | None = None
    encode_report: Report | None = None

    @property
    def reports(self) -> tuple[Report, ...]:
        """The bad-row reports so far: the load report, then the encode report once encoded."""
        return (self.loaded,) if self.encode_report is None else (self.loaded, self.encode_report)


def load_data(d: DataConfig, path: str | Path, limit: int | None = None) -> tuple[list[Example], Report]:
    """The examples of `path` read as `d` says (format, fields, prompt_chars, on_bad, split, name)."""
    from sm_dist.data.datasets import load_examples

    return load_examples(path, **d.load_kwargs(), limit=limit)


def load_train_data(cfg: Config, tok=None, generate: bool = True) -> TrainData | None:
    """data.train_path loaded once and, with `tok`, encoded. A missing path is generated from
    data.fallback when `generate` (into the run directory), else None (nothing to read yet)."""
    from sm_dist.data.sources import source_exists

    d = cfg.data
    path = d.train_path
    if not source_exists(path) and d.fallback != "none":
        if not generate:
            return None
        path = _generated_train_file(cfg)
    examples, loaded = load_data(d, path, limit=d.limit)
    data = TrainData(str(path), examples, loaded)
    return encode_data(cfg, tok, data) if tok is not None and examples else data


def _generated_train_file(cfg: Config) -> Path:
    """The add_or_sub_in_base file data.fallback generates under the run directory (kept for a resume)."""
    from sm_dist.data.arith import generate

    d = cfg.data
    level = d.fallback.removeprefix("arith_")
    path = Path(cfg.run.run_dir) / "data" / f"add_or_sub_in_base.train-{level}.generated.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = generate(d.fallback_size, level, seed=cfg.run.seed)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log.warning(
        f"data.train_path {d.train_path} is missing; using generated {path} (data.fallback={d.fallback})"
    )
    return path


def encode_data(cfg: Config, tok, data: TrainData) -> TrainData:
    """`data` encoded with `tok`, checked against data.max_prompt_len/max_answer_len (data.on_bad)."""
    from sm_dist.data.datasets import encode_examples

    d = cfg.data
    enc, report = encode_examples(
        data.examples, tok, d.max_prompt_len, d.max_answer_len, on_overlong=d.on_bad, source=data.path
    )
    return dataclasses.replace(data, encoded=enc, encode_report=report)


def build_data(
    cfg: Config, tok, data: TrainData | None = None
) -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """Augmented expert rows (for the expert buffer), the encoded prompts (for rollout workers) and
    their expert targets (answer + eos: for rollout.correction_rows). `data`: what preflight validation
    loaded (encoded when its tokenizer was the run's); None reads data.train_path here."""
    from sm_dist.data.datasets import log as data_log
    from sm_dist.data.datasets import no_usable_examples

    if data is None:
        data = load_train_data(cfg, tok)
    else:  # validation read it quietly: its bad-row counts are reported now, as a fresh read would
        for r in data.reports:
            if r.skipped:
                data_log.warning("%s", r.summary())
    if data.encoded is None and data.examples:
        data = encode_data(cfg, tok, data)
    if not data.encoded:
        raise no_usable_examples("data.train_path", data.path, *data.reports)
    rows = augment_rows(cfg, tok, data.encoded, "data")
    return rows, [e.prompt_ids for e in data.encoded], [e.target_ids for e in data.encoded]


def encode_rows(cfg: Config, tok, examples: list, path: str, id_prefix: str = "data"):
    """Examples -> (expert-buffer rows, the encoded examples, the encoding report): encoded and checked
    as `encode_data` does, then `augment_rows`. Used for data.watch_dir files."""
    from sm_dist.data.datasets import Report

    data = encode_data(cfg, tok, TrainData(path, examples, Report(source=path)))
    enc = data.encoded or []
    return (augment_rows(cfg, tok, enc, id_prefix) if enc else []), enc, data.encode_report


def augment_rows(cfg: Config, tok, enc: list[EncodedExample], id_prefix: str) -> list[dict]:
    """Encoded examples noise-augmented `data.augment_copies` times into expert-buffer rows; row ids
    f"{id_prefix}{copy}-{i}". Shared by data.train_path and data.watch_dir."""
    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.data.datasets import augment, make_data_rows
    from sm_dist.data.noise import CANDIDATE_KINDS, noise_candidates

    d = cfg.data
    bk = get_bkspc_id(tok)
    specials = set(tok.all_special_ids) | {bk}
    if d.noise.kind == "task":
        noise_ids = sorted({t for e in enc for t in e.target_ids} - specials)
    else:
        noise_ids = [i for i in range(len(tok)) if i not in specials]
    cands = None
    if d.noise.kind in CANDIDATE_KINDS:  # per-position candidates (sm_dist.data.noise)
        cands = noise_candidates(d.noise, enc, tok)
    rows: list[dict] = []
    for c in range(d.augment_copies):
        if cands is not None:
            from sm_dist.data.noise import augment_with_candidates

            aug = augment_with_candidates(enc, bk, d.p_noise, cands, seed=cfg.run.seed + c)
        else:
            aug = augment(enc, bk, d.p_noise, noise_ids, seed=cfg.run.seed + c)
        rows += make_data_rows(aug, bk, id_prefix=f"{id_prefix}{c}")
    return rows
