"""Loading a run configuration: YAML + `a.b.c=value` overrides -> a validated, path-resolved `Config`;
`dump_config` and the `--reference` generator (docs/config.md). Imports no torch, Ray or vLLM.

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
import types
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from sm_dist.config import Config, ConfigError
from sm_dist.data.sources import is_hub_id, source_exists
from sm_dist.hub import resolve_model

# ---- loading ----------------------------------------------------------------------------------------


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(
                ".".join(parts[: i + 1]),
                f"is {nxt!r}, not a section; cannot set {key}.",
                "check the key's spelling",
            )
        cur = nxt
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
    key = ".".join(str(x) for x in err["loc"]) or "<root>"
    typ, msg = err["type"], err["msg"]
    if typ == "extra_forbidden":
        section = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed_keys(section)
        return ConfigError(key, "unknown key.", f"remove it or use one of: {', '.join(allowed)}")
    if typ.startswith("value_error"):  # our own validators already name the key and the fix
        inner = msg.removeprefix("Value error, ")
        m = re.match(r"([a-z_][a-z0-9_.]*): (.*)", inner, re.S)
        return ConfigError(m.group(1), m.group(2)) if m else ConfigError(key, inner)
    bad = err.get("input")
    return ConfigError(
        key, f"{msg} (got {bad!r}).", f"see `{key}` in `sm-dist config --reference` (docs/config.md)"
    )


def _allowed_keys(section: str) -> list[str]:
    cls: type[BaseModel] = Config
    for p in [p for p in section.split(".") if p]:
        ann = cls.model_fields[p].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return sorted(cls.model_fields)


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


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read YAML `path` (None: all defaults), apply `a.b.c=value` overrides, validate, resolve paths.

    Raises ConfigError (dotted key + message + fix) for a missing file, bad YAML, unknown keys, wrong
    types, failed cross-field checks and missing model/data paths.
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
    return config_from_dict(raw, overrides, cpath)


def config_from_dict(raw: dict, overrides: list[str] | None = None, cpath: Path | None = None) -> Config:
    """`load_config` from a mapping already read (`cpath`: the file it came from, for relative paths)."""
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(list(overrides or [])):
        _set_dotted(raw, key, value)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise _validation_error(e) from None
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


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what the run logs and saves as `<run_dir>/config.yaml`)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _type_name(ann: Any) -> str:
    """A short, readable type for the reference: `int`, `float | null`, `"ddp" | "fsdp2"`, ..."""
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if _variants(ann):
        return " \\| ".join(f"`{a.model_fields['kind'].default}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    return getattr(ann, "__name__", str(ann))


def _variants(ann: Any) -> list[type[BaseModel]]:
    """The member models of a union of pydantic models (a discriminated union), else []."""
    import typing

    if typing.get_origin(ann) not in (typing.Union, types.UnionType):
        return []
    args = typing.get_args(ann)
    ok = all(isinstance(a, type) and issubclass(a, BaseModel) and "kind" in a.model_fields for a in args)
    return list(args) if ok else []


def _md_cell(text: str) -> str:
    """Text for a markdown table cell: `|` escaped, and `<` outside code spans (else `<bkspc>` would
    read as an HTML tag and vanish)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def reference() -> str:
    """Every config key (dotted), with its type, default and description, as markdown: the source of
    `docs/config.md` and of `sm-dist config --reference`."""
    out = [
        "# Config reference",
        "",
        "Every key of a run config (`sm-dist train CONFIG key=value ...`), with its type, default and",
        "meaning. Generated from `sm_dist/config.py` by `sm-dist config --reference`; do not edit by hand.",
        "",
    ]

    def section(cls: type[BaseModel], prefix: str, title: str | None = None) -> None:
        nested: list[tuple[str, type[BaseModel], str | None]] = []
        rows = []
        for name, f in cls.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((f"{prefix}{name}", ann, None))
                continue
            variants = _variants(ann)
            if variants:  # a discriminated union (sync.transport): one section per kind
                for v in variants:
                    kind = v.model_fields["kind"].default
                    nested.append((f"{prefix}{name}", v, f"`{prefix}{name}` with `kind: {kind}`"))
            default = f.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
            shown = shown.removesuffix("\n...").strip()
            text = _md_cell(f.description or "")
            rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | `{shown}` | {text} |")
        if rows:
            head = title or "`" + prefix.rstrip(".") + "`"
            out.extend([f"## {head}", "", (cls.__doc__ or "").strip(), ""])
            out.extend(["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for name, sub, sub_title in nested:
            section(sub, f"{name}.", sub_title)

    section(Config, "")
    return "\n".join(out).rstrip() + "\n"
