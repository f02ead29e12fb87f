"""Preparing a run's model and expert data from its config (the driver's set-up, before any actor).

`prepare_model` builds the tiny model when asked; `build_data` loads, encodes and noise-augments the
expert examples into Arrow-ready rows for the expert buffer and the encoded prompts for the rollout
workers. A missing `data.train_path` is generated only with an explicit `data.fallback`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sm_dist.config import Config

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


def load_train_examples(cfg: Config):
    """(examples, the path read, its load report) from data.train_path, or from generated arithmetic data
    (data.fallback) when it is missing."""
    from sm_dist.data.datasets import load_examples
    from sm_dist.data.sources import source_exists

    path = Path(cfg.data.train_path)
    d = cfg.data
    if not source_exists(d.train_path):
        from sm_dist.data.arith import generate

        level = d.fallback.removeprefix("arith_")
        path = Path(cfg.run.run_dir) / "data" / f"add_or_sub_in_base.train-{level}.generated.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = generate(d.fallback_size, level, seed=cfg.run.seed)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        log.warning(
            f"data.train_path {d.train_path} is missing; using generated {path} (data.fallback={d.fallback})"
        )
    ex, report = load_examples(path, **d.load_kwargs(), limit=d.limit)
    return ex, str(path), report


def build_data(cfg: Config, tok) -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """Augmented expert rows (for the expert buffer), the encoded prompts (for rollout workers) and
    their expert targets (answer + eos: for rollout.correction_rows)."""
    from sm_dist.data.datasets import no_usable_examples

    examples, path, loaded = load_train_examples(cfg)
    rows, enc, encoded = encode_rows(cfg, tok, examples, path)
    if not enc:
        raise no_usable_examples("data.train_path", path, loaded, encoded)
    return rows, [e.prompt_ids for e in enc], [e.target_ids for e in enc]


def encode_rows(cfg: Config, tok, examples: list, path: str, id_prefix: str = "data"):
    """Examples -> (expert-buffer rows, the encoded examples, the encoding report): encoded, checked
    against data.max_prompt_len/max_answer_len (data.on_bad), noise-augmented `data.augment_copies`
    times; row ids f"{id_prefix}{copy}-{i}". Shared by data.train_path and data.watch_dir."""
    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.data.datasets import augment, encode_examples, make_data_rows
    from sm_dist.data.noise import CANDIDATE_KINDS, noise_candidates

    d = cfg.data
    enc, encoded = encode_examples(
        examples, tok, d.max_prompt_len, d.max_answer_len, on_overlong=d.on_bad, source=path
    )
    if not enc:
        return [], enc, encoded
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
    return rows, enc, encoded
