"""Checks of what a user passes, run before anything expensive starts (Ray, vLLM, a learner).

Each check raises a `sm_dist.errors.UserError` naming the input, the problem and the fix, so a bad
model folder, data file or checkpoint costs seconds, not a vLLM start-up:

* `check_model_dir`: an HF folder with config.json, a loadable tokenizer that has `<bkspc>`, a vocab
  that covers it, and safetensors weights whose headers match their file sizes.
* `check_train_data`: the data file is readable and leaves at least one usable example (and enough
  prompts for the rollout workers); otherwise the count of each kind of bad row. The data it reads
  (`data.prepare.load_train_data`, encoded with the run's tokenizer) is returned for the driver's
  `build_data`: the data is read and encoded once.
* `preflight`: what `sm-dist train` checks before it writes anything or starts Ray: the above, and the
  checkpoint to resume from (`resume_checkpoint`: the newest intact one; see `learner.checkpoint.verify`).

Imports no Ray or vLLM; transformers only inside `check_model_dir`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sm_dist.config import Config, ConfigError
from sm_dist.data.prepare import TrainData
from sm_dist.errors import CheckpointError, ModelError
from sm_dist.orchestrator.storage import check_buffer_shards

log = logging.getLogger("sm_dist.validate")

_ADD_BKSPC = "sm-dist add-bkspc BASE_MODEL_DIR OUT_DIR builds a usable folder from any HF causal LM"


def check_model_dir(path: str | Path, what: str = "model.dir"):
    """Check the model folder `path` (passed as `what`: a config key or a flag); return its tokenizer."""
    d = Path(path)
    if not d.is_dir():
        problem = "is a file, not a model folder" if d.exists() else "does not exist"
        raise ModelError(
            what, f"{d} {problem}.", f"point {what} at an HF model folder with <bkspc> ({_ADD_BKSPC})"
        )
    try:
        config = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise ModelError(what, f"{d} has no config.json: not an HF model folder.", _ADD_BKSPC) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(what, f"{d}/config.json is not valid JSON ({e}).", "restore the file") from None
    _check_weights(d, what)
    tok = _load_tokenizer(d, what)
    from sm_dist.core.vocab import BkspcError, get_bkspc_id

    try:
        bid = get_bkspc_id(tok)
    except BkspcError as e:
        raise ModelError(
            what, f"{d}: {e}", f"sm-dist add-bkspc {d} {d}-bkspc, then use that folder"
        ) from None
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if isinstance(vocab, int) and bid >= vocab:
        raise ModelError(
            what,
            f"{d}: <bkspc> has id {bid} but config.json has vocab_size={vocab}: the model was not resized for it.",
            f"sm-dist add-bkspc {d} {d}-bkspc (resizes the embeddings and the head)",
        )
    return tok


def _check_weights(d: Path, what: str) -> None:
    from sm_dist.learner.checkpoint import safetensors_problem

    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        if any(d.glob("*.bin")):
            raise ModelError(
                what,
                f"{d} has PyTorch .bin weights, not safetensors.",
                _ADD_BKSPC + " (it saves safetensors)",
            )
        raise ModelError(what, f"{d} has no *.safetensors weights.", "copy the weights in, or " + _ADD_BKSPC)
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(what, f"{index} is unreadable ({e}).", "restore the file") from None
        missing = sorted(s for s in shards if not (d / s).is_file())
        if missing:
            raise ModelError(
                what, f"{d} lacks the weight shards {missing} named in its index.", "copy them in"
            )
    for w in weights:
        if problem := safetensors_problem(w):
            raise ModelError(
                what, f"{d}: {problem}.", "restore the weights file (copy it again, or re-save the model)"
            )


def _load_tokenizer(d: Path, what: str):
    from transformers import AutoTokenizer

    try:  # deliberate: any failure here is a property of the user's folder, reported as such
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())[:300]
        raise ModelError(
            what,
            f"{d} has no loadable tokenizer ({type(e).__name__}: {msg}).",
            "copy the base model's tokenizer files (tokenizer.json, tokenizer_config.json) into it",
        ) from None


def check_train_data(cfg: Config, tok=None, runs_tok: bool = True) -> TrainData | None:
    """Load (and with a tokenizer, encode) `data.train_path` as the driver will; raise a DataError
    when no example is usable. Returns what was read, for the driver (encoded only when `runs_tok`:
    `tok` is the run's own tokenizer); None when a missing file is left to `data.fallback`."""
    from sm_dist.data.datasets import no_usable_examples
    from sm_dist.data.prepare import load_train_data

    with _Quiet(logging.getLogger("sm_dist.data")):  # the driver's build_data reports the bad rows
        data = load_train_data(cfg, tok, generate=False)
    if data is None:
        return None
    if not (data.encoded if tok is not None else data.examples):
        raise no_usable_examples("data.train_path", cfg.data.train_path, *data.reports)
    _check_examples(cfg, tok, data.encoded or data.examples)
    if not runs_tok:  # encoded with a stand-in for the tiny model's tokenizer: the driver encodes again
        return TrainData(data.path, data.examples, data.loaded)
    return data


class _Quiet:
    """A logger held at ERROR for a block (its warnings would repeat the driver's own, a moment later)."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.level = logger, logger.level

    def __enter__(self):
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _check_examples(cfg: Config, tok, examples: list) -> None:
    d = cfg.data
    if tok is not None and (empty := sum(not e.prompt_ids for e in examples)):
        raise ConfigError(
            "data.format.prompt_chars",
            f"{empty} of {len(examples)} prompts in {d.train_path} encode to 0 tokens (plain-text rows with "
            f"data.format.prompt_chars={d.format.prompt_chars}, and a tokenizer that adds no BOS): the model has "
            "nothing to generate from.",
            "set data.format.prompt_chars=N (the first N characters of each text become its prompt), or give "
            "rows a prompt field",
        )
    if tok is not None and d.noise.kind == "task" and d.p_noise > 0:
        specials = set(tok.all_special_ids)
        if len({t for e in examples for t in e.target_ids} - specials) < 2:
            raise ConfigError(
                "data.noise",
                f"the answers in {d.train_path} use fewer than 2 distinct tokens: no wrong token to draw as noise.",
                "set data.noise.kind=vocab, or data.p_noise=0, or use more varied answers",
            )
    if tok is not None and len(examples) < cfg.rollout.num_workers:
        raise ConfigError(
            "rollout.num_workers",
            f"{len(examples)} usable prompts in {d.train_path} cannot feed {cfg.rollout.num_workers} workers.",
            "use fewer rollout workers or more data",
        )


def _run_tokenizer(cfg: Config):
    """(tokenizer, whether it is the run's own): the model folder's, or (a tiny model built at start) a
    stand-in trained as `make_tiny_model` trains its own, so the data is checked before anything is
    built; (None, False) when there is none to check with."""
    if Path(cfg.model.dir).exists():
        return check_model_dir(cfg.model.dir), True
    if cfg.model.start_from:  # the run's model will be a copy of it
        return check_model_dir(cfg.model.start_from, "model.start_from"), True
    if cfg.model.make_tiny_if_missing:
        from sm_dist.core.tiny import ARITH_ALPHABET, train_tokenizer

        return train_tokenizer(None, alphabet=ARITH_ALPHABET), False
    return None, False


def check_engine_limits(cfg: Config) -> None:
    """`rollout.engine.*` against the model's own limits, which vLLM would refuse at actor start-up."""
    from sm_dist.core.tiny import TINY_POSITIONS
    from sm_dist.eval.target import model_positions

    md = Path(cfg.model.dir)
    if not md.exists() and cfg.model.start_from:
        md = Path(cfg.model.start_from)  # the run's model will be a copy of it
    positions = model_positions(md) if md.exists() else TINY_POSITIONS
    e = cfg.rollout.engine
    if positions is not None and e.max_model_len > positions:
        where = f"{md}/config.json" if md.exists() else "the tiny model built at start"
        raise ConfigError(
            "rollout.engine.max_model_len",
            f"{e.max_model_len} exceeds the model's {positions} positions ({where}); vLLM refuses an engine "
            "longer than its model.",
            f"set rollout.engine.max_model_len={positions} or less (it must hold data.max_prompt_len + "
            f"rollout.max_actions = {cfg.data.max_prompt_len + cfg.rollout.max_actions})",
        )


def check_run_dir_writable(cfg: Config) -> None:
    """The run directory can be created and written (not read-only, not full): a probe file is written
    and removed, so nothing is left behind."""
    import errno
    import os
    import uuid

    d = Path(cfg.run.run_dir)
    top = next((p for p in [d, *d.parents] if p.exists()), None)
    if top is not None and not top.is_dir():
        raise ConfigError("run.run_dir", f"{top} is a file, not a folder.", "pick another run.run_dir")
    created = [p for p in [d, *d.parents] if not p.exists()][::-1]
    probe = d / f".write-probe-{uuid.uuid4().hex}"
    st = None if created else d.stat()
    try:
        d.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as f:
            f.write(b"\0" * 65536)  # a disk with no room for this has none for a checkpoint
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise ConfigError(
            "run.run_dir",
            f"cannot write to {d} ({e.strerror}).",
            "free space on that filesystem (df -h), or pick a run.run_dir on another one"
            if full
            else "pick a run.run_dir on a writable filesystem, or fix its permissions",
        ) from None
    finally:
        probe.unlink(missing_ok=True)
        if st is not None:  # the folder as it was, its times included
            os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
        for p in reversed(created):  # leave nothing: the run itself creates the folder later
            try:
                p.rmdir()
            except OSError:
                break


def check_api_port(cfg: Config) -> None:
    """A fixed `run.api_port` that is taken fails here, not after the actors are up."""
    import socket

    r = cfg.run
    if not r.api_port:
        return
    with socket.socket(socket.AF_INET6 if ":" in r.api_host else socket.AF_INET) as s:
        try:
            s.bind((r.api_host, r.api_port))
        except OSError as e:
            raise ConfigError(
                "run.api_port",
                f"the control API cannot listen on {r.api_host}:{r.api_port} ({e.strerror}).",
                "pick another run.api_port (0: a free one), stop what holds it, or set run.api_host",
            ) from None


def preflight(cfg: Config, resume: str | None) -> tuple[Path | None, TrainData | None]:
    """Check the model, the data, the engine settings, the run directory, the API port and (with
    `resume`) the run to resume before anything is written or started; return the checkpoint to resume
    from (None for a fresh run) and the training data read (`check_train_data`, for `build_data`)."""

    data = check_train_data(cfg, *_run_tokenizer(cfg))
    check_engine_limits(cfg)
    check_run_dir_writable(cfg)
    check_api_port(cfg)
    if not resume:
        return None, data
    check_resume_config(cfg, Path(cfg.run.run_dir))
    check_buffer_shards(Path(cfg.run.run_dir), cfg.buffer.shards)
    return resume_checkpoint(Path(cfg.run.run_dir), resume), data


# keys a resume cannot change, and why (a prefix ending in "." covers a section)
FROZEN_ON_RESUME = {
    "model.tiny.": "the checkpoint's weights keep the shape the run started with (model.tiny only shapes a "
    "model built when model.dir is missing)",
    "model.dir": "the checkpoint's weights and tokenizer come from the run's model; another folder would "
    "encode the data with another tokenizer",
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(cfg: Config, run_dir: Path) -> dict[str, tuple]:
    """Log the keys that differ from the run's saved config (its config.yaml);
    raise a ConfigError for a change that cannot take effect on a resume. Returns {key: (saved, new)}."""
    import yaml

    latest = run_dir / "config.yaml"
    if not latest.is_file():
        log.warning(f"--resume: {run_dir} has no saved config.yaml; the overrides cannot be compared")
        return {}
    try:
        saved = _flat(yaml.safe_load(latest.read_text()))
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(
            str(latest),
            f"is not a readable config ({type(e).__name__}).",
            "restore it, or delete it to skip the comparison",
        ) from None
    new = _flat(cfg.model_dump(mode="json"))
    default_dir = {saved.get("run.run_dir", "") + "/model", str(run_dir) + "/model"}
    diff = {k: (saved.get(k), v) for k, v in new.items() if k != "run.run_dir" and saved.get(k) != v}
    if {saved.get("model.dir"), new.get("model.dir")} <= default_dir:
        diff.pop("model.dir", None)  # the default `<run_dir>/model` of a run directory that moved
    if diff:
        log.info("--resume: keys that differ from " + f"{latest.name}: "
                 + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))  # fmt: skip
    for key, (a, b) in diff.items():
        why = next(
            (w for k, w in FROZEN_ON_RESUME.items() if key == k or (k.endswith(".") and key.startswith(k))),
            None,
        )
        if why:
            raise ConfigError(
                key, f"--resume cannot change it ({a!r} in {latest} -> {b!r}): {why}.",
                "drop the override, or start a new run (another run.run_dir) with it",
            )  # fmt: skip
    if any(k.startswith("data.") for k in diff):
        log.warning(
            "--resume: data.* changes reach the rollout prompts only; the expert buffer keeps its rows"
        )
    return diff


def resume_checkpoint(run_dir: Path, resume: str) -> Path:
    """The newest intact checkpoint of `run_dir` (`checkpoint.verify`). Newer corrupt ones are renamed
    `step-N.corrupt` (kept, out of the way of new checkpoints and pruning) and logged with the reason."""
    from sm_dist.learner import checkpoint as ckpt

    ckpts = ckpt.list_checkpoints(run_dir)
    what = f"--resume {resume}"
    if not ckpts:
        where = "has no completed checkpoint under checkpoints/" if run_dir.is_dir() else "does not exist"
        raise CheckpointError(
            what, f"{run_dir} {where}.", "pass the run.run_dir of a run that saved a checkpoint"
        )
    rejected: list[tuple[Path, str]] = []
    for c in reversed(ckpts):
        why, had_manifest = ckpt.verify(c)
        if why is None:
            break
        rejected.append((c, why))
    else:
        whys = "; ".join(f"{c.name}: {why}" for c, why in rejected)
        raise CheckpointError(
            what,
            f"none of the {len(ckpts)} checkpoints in {ckpt.checkpoints_dir(run_dir)} is intact ({whys}).",
            "restore one from a copy, or start a new run (another run.run_dir); nothing was changed",
        )
    if not had_manifest:
        log.warning(f"checkpoint {c.name} has no {ckpt.MANIFEST} (written before manifests): "
                    "checked its structure only (files present, JSON, safetensors headers, optimizer CRCs)")  # fmt: skip
    if rejected:
        from sm_dist.service.status import RunDirBusy, check_free

        try:  # renaming checkpoints under a live driver would pull them from under it
            check_free(run_dir)
        except RunDirBusy as e:
            raise ConfigError("run.run_dir", str(e)) from None
    for bad, why in rejected:
        kept = ckpt.set_aside(bad)
        log.warning(f"checkpoint {bad.name} is corrupt ({why}): kept as {kept}; resuming from {c.name}")
    return c
