"""Loading a run configuration: YAML + `a.b.c=value` overrides -> a validated, path-resolved `Config`,
and the config a `--resume` runs with. Imports no torch, Ray, vLLM or transformers (huggingface_hub
only where a hub model id is resolved).

Path rules (`load_config`): a relative path in `model.dir` / `data.train_path` is looked up against the
current directory, then the config file's directory, then its parent (the repo root for `configs/*.yaml`);
the first that exists wins, else the current-directory path is kept. `run.run_dir` resolves against the
current directory. `model.dir: null` means `<run_dir>/model` (built there when `make_tiny_if_missing`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sm_dist.config.base import ConfigError, variant_of, variants
from sm_dist.config.root import Config
from sm_dist.data.sources import is_hub_id, source_exists
from sm_dist.hub import resolve_model

# ---- overrides and validation errors ----------------------------------------------------------------


def _walk(loc: list[str]) -> tuple[list[str], type[BaseModel] | None]:
    """A pydantic error location -> (its dotted key parts, a union's tags left out; the section class
    the last part lies in, or None)."""
    parts: list[str] = []
    cls: type[BaseModel] | None = Config
    i = 0
    while i < len(loc):
        name, i = loc[i], i + 1
        parts.append(name)
        field = cls.model_fields.get(name) if cls is not None else None
        ann = field.annotation if field is not None else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        elif variants(ann) and i < len(loc) and (tagged := variant_of(ann, loc[i])) is not None:
            cls, i = tagged, i + 1
        else:
            cls = None
    return parts, cls


def _union_default(parts: list[str]) -> dict | None:
    """`{kind: ...}` of the default of the union field at `parts` (None when it is no union)."""
    *section, name = parts
    _, cls = _walk(section)
    field = cls.model_fields.get(name) if cls is not None else None
    if field is None or not variants(field.annotation):
        return None
    return {"kind": field.get_default(call_default_factory=True).kind}


def _set_dotted(d: dict, key: str, value: Any) -> None:
    """Set `a.b.c` in the raw mapping. A union not given opens as its default `{kind: ...}`; setting a
    union's `kind` to another kind replaces the whole variant (the old kind's parameters are not the
    new one's), so `objective.divergence.kind=mle` works whatever the file set beside chi2_mixture."""
    parts = key.split(".")
    cur = d
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = _union_default(parts[: i + 1]) or {}
        if not isinstance(nxt, dict):
            raise ConfigError(
                ".".join(parts[: i + 1]),
                f"is {nxt!r}, not a section; cannot set {key}.",
                "check the key's spelling",
            )
        cur = nxt
    if parts[-1] == "kind" and cur.get("kind") != value and _union_default(parts[:-1]) is not None:
        cur.clear()
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b.c=value` strings -> (key, YAML-typed value)."""
    out = []
    for o in overrides:
        key, sep, raw = o.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(o, "an override must look like section.key=value.", "e.g. learner.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(key, f"value {raw!r} is not valid YAML ({e}).", "quote strings") from None
        out.append((key.strip(), value))
    return out


def _validation_error(e: ValidationError) -> ConfigError:
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    parts, _ = _walk(loc)
    key = ".".join(parts) or "<root>"
    typ, msg = err["type"], err["msg"]
    if typ == "extra_forbidden":
        _, section = _walk(loc[:-1])
        allowed = sorted(section.model_fields) if section is not None else []
        which = f" for kind {loc[-2]}" if "kind" in allowed else ""
        return ConfigError(key, f"unknown key{which}.", f"remove it or use one of: {', '.join(allowed)}")
    if typ.startswith("value_error"):  # our own validators already name the key and the fix
        inner = msg.removeprefix("Value error, ")
        m = re.match(r"([a-z_][a-z0-9_.]*): (.*)", inner, re.S)
        return ConfigError(m.group(1), m.group(2)) if m else ConfigError(key, inner)
    bad = err.get("input")
    return ConfigError(
        key, f"{msg} (got {bad!r}).", f"see `{key}` in `sm-dist config --reference` (docs/config.md)"
    )


# ---- paths ------------------------------------------------------------------------------------------


def _resolve(path: str, bases: list[Path]) -> str:
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return str(p)
    for b in bases:
        if (b / p).exists():
            return str((b / p).resolve())
    return str((bases[0] / p).resolve())


RUN_ROOT_ENV = "SM_DIST_RUN_ROOT"  # where a relative run.run_dir goes, when set (deploy/ sets /shared/runs)


def resolve_run_dir(raw: str) -> str:
    """`run.run_dir` as an absolute path: as given; else under $SM_DIST_RUN_ROOT (said in the log);
    else under the current directory, except in a `ray job submit` driver, whose current directory
    is a per-job copy of --working-dir that Ray deletes: a `ConfigError` there."""
    import logging

    p = Path(os.path.expanduser(raw))
    if p.is_absolute():
        return str(p)
    if root := os.environ.get(RUN_ROOT_ENV):
        out = str((Path(root) / p).resolve())
        logging.getLogger("sm_dist.driver").info(
            f"run.run_dir={raw} is relative: {out} (under ${RUN_ROOT_ENV})"
        )
        return out
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray's job supervisor for the entrypoint
        raise ConfigError(
            "run.run_dir",
            f"{raw} is relative, and this driver runs under `ray job submit`, whose current directory "
            f"({Path.cwd()}) is a per-job copy of --working-dir on the head node, deleted with the job and "
            "invisible to the other nodes.",
            f"give run.run_dir an absolute path on storage every node mounts (e.g. run.run_dir=/shared/runs/"
            f"NAME), or set {RUN_ROOT_ENV}=/shared/runs (runtime_env env_vars) to put relative run dirs there",
        )
    return str((Path.cwd() / p).resolve())


def resolve_paths(cfg: Config, config_path: Path | None) -> Config:
    """Absolute paths (module docstring rules); `model.dir` null -> `<run_dir>/model`."""
    bases = [Path.cwd()]
    if config_path is not None:
        bases += [config_path.parent.resolve(), config_path.parent.resolve().parent]
    run_dir = resolve_run_dir(cfg.run.run_dir)
    m = cfg.model  # a hub model id becomes its folder in the huggingface_hub cache (sm_dist.hub)
    hub_dir = resolve_model(m.dir, bases, "model.dir") if m.dir and not m.make_tiny_if_missing else None
    model_dir = hub_dir or (_resolve(m.dir, bases) if m.dir else str(Path(run_dir) / "model"))
    out = cfg.model_copy(deep=True)
    out.run.run_dir = run_dir
    out.model.dir = model_dir
    raw = cfg.data.train_path  # a hub dataset id stays as it is (sm_dist.data.sources)
    out.data.train_path = raw if is_hub_id(raw, bases) else _resolve(raw, bases)
    if cfg.run.eval_path:
        out.run.eval_path = _resolve(cfg.run.eval_path, bases)
    if cfg.model.start_from:
        out.model.start_from = _resolve(cfg.model.start_from, bases)
    if cfg.data.watch_dir:
        out.data.watch_dir = str((Path.cwd() / os.path.expanduser(cfg.data.watch_dir)).resolve())
    return out


def check_paths(cfg: Config) -> None:
    """Files that must exist at load time."""
    md = Path(cfg.model.dir)
    if not md.exists() and not cfg.model.make_tiny_if_missing:
        raise ConfigError(
            "model.dir",
            f"model folder {md} does not exist.",
            "point model.dir at an HF model folder with <bkspc> (sm-dist add-bkspc), or set "
            "model.make_tiny_if_missing=true",
        )
    if md.exists() and not (md / "config.json").exists():
        raise ConfigError(
            "model.dir",
            f"{md} has no config.json; it is not an HF model folder.",
            "point model.dir at an HF model folder with <bkspc> (sm-dist add-bkspc BASE OUT makes one)",
        )
    named = re.search(r"train-(easy|medium|hard)", Path(cfg.data.train_path).name)
    if cfg.data.fallback != "none" and named and cfg.data.fallback != f"arith_{named[1]}":
        raise ConfigError(
            "data.fallback",
            f"{cfg.data.fallback} would replace the {named[1]} split named by data.train_path "
            f"({cfg.data.train_path}) with another level if that file were missing.",
            f"set data.fallback=arith_{named[1]} (or none)",
        )
    if not source_exists(cfg.data.train_path) and cfg.data.fallback == "none":
        raise ConfigError(
            "data.train_path",
            f"{cfg.data.train_path} does not exist and data.fallback is 'none'.",
            f"fix the path, or set data.fallback=arith_{named[1] if named else 'easy'} to generate arithmetic data",
        )
    if cfg.model.start_from and not (Path(cfg.model.start_from) / "config.json").is_file():
        raise ConfigError(
            "model.start_from",
            f"{cfg.model.start_from} is not an HF model folder (no config.json).",
            "point it at a model folder with <bkspc>, or set model.start_from=null",
        )
    if cfg.run.eval_path and not Path(cfg.run.eval_path).is_file():
        raise ConfigError(
            "run.eval_path",
            f"{cfg.run.eval_path} is not a file.",
            "point it at a held-out jsonl/parquet of prompt/answer rows, or set run.eval_path=null",
        )


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | None = None, *, paths: bool = True
) -> Config:
    """Read YAML `path` (None: all defaults), apply `a.b.c=value` overrides, validate, resolve paths.

    Raises ConfigError (dotted key + message + fix) for a missing file, bad YAML, unknown keys, wrong
    types, failed cross-field checks and missing model/data paths. `paths=False`: the schema and the
    cross-field checks only, paths left as written (a config for another machine, e.g. deploy/submit.sh).
    """
    raw: dict = {}
    cpath = Path(path) if path is not None else None
    if cpath is not None:
        if not cpath.is_file():
            raise ConfigError(
                "<file>",
                f"config file {cpath} does not exist.",
                "pass a YAML file, e.g. configs/tiny-cpu.yaml",
            )
        try:
            raw = yaml.safe_load(cpath.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("<file>", f"{cpath} is not valid YAML: {e}", "correct the YAML") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                "<root>",
                f"{cpath} must hold a mapping of sections, got {type(raw).__name__}.",
                "see configs/tiny-cpu.yaml for the layout",
            )
    return config_from_dict(raw, overrides, cpath, paths=paths)


def config_from_dict(
    raw: dict, overrides: list[str] | None = None, cpath: Path | None = None, *, paths: bool = True
) -> Config:
    """`load_config` from a mapping already read (`cpath`: the file it came from, for relative paths)."""
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(list(overrides or [])):
        _set_dotted(raw, key, value)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise _validation_error(e) from None
    if not paths:
        return cfg
    cfg = resolve_paths(cfg, cpath)
    check_paths(cfg)
    return cfg


SAVED_CONFIG = "config.yaml"  # a run's resolved config, in its run directory


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def load_resume_config(run_dir: str, config_path: str | None, overrides: list[str]) -> Config:
    """The config a `--resume RUN_DIR` runs with: the run's saved `config.yaml` with `overrides` on top.

    A config file given beside it never changes the run silently: where it differs from the saved
    config (overrides aside), a `ConfigError` lists the keys and the overrides that would apply them.
    A run without a saved config (written before its first step) takes the config file as its base."""
    rd = Path(resolve_run_dir(run_dir))
    saved_path = rd / SAVED_CONFIG
    ovr = [*overrides, f"run.run_dir={rd}"]
    if not saved_path.is_file():
        if config_path is None:
            where = "has no saved config.yaml" if rd.is_dir() else "does not exist"
            raise ConfigError(
                "--resume", f"{rd} {where}.",
                "pass the run.run_dir of a run that `sm-dist train` started (or give its CONFIG too)",
            )  # fmt: skip
        return load_config(config_path, ovr)
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(
            "--resume", f"{saved_path} is not readable YAML ({type(e).__name__}).",
            "restore it from config.*.yaml beside it, or pass the run's CONFIG file and delete it",
        ) from None  # fmt: skip
    old_dir = (saved.get("run") or {}).get("run_dir")
    if (saved.get("model") or {}).get("dir") == f"{old_dir}/model":  # the run dir moved: its model too
        saved["model"]["dir"] = None
    cfg = config_from_dict(saved, ovr, saved_path)
    if config_path is not None:
        _refuse_differing_file(cfg, load_config(config_path, ovr), config_path, saved_path)
    return cfg


def _refuse_differing_file(cfg: Config, given: Config, config_path: str, saved_path: Path) -> None:
    a, b = _flat(cfg.model_dump(mode="json")), _flat(given.model_dump(mode="json"))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if not diff:
        return
    listed = ", ".join(f"{k} ({a.get(k)!r} saved, {b.get(k)!r} in the file)" for k in diff[:8])
    more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
    apply = " ".join(_override(k, b.get(k)) for k in diff[:8])
    raise ConfigError(
        "--resume",
        f"{config_path} differs from the run's saved {saved_path} in {listed}{more}; a resume continues "
        "the saved config.",
        f"drop {config_path} (sm-dist train --resume {saved_path.parent}) to continue as saved, or add "
        f"the overrides that change it: {apply}",
    )
