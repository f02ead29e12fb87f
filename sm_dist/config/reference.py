"""The config as text: `dump_config` (what a run saves as `<run_dir>/config.yaml`) and `reference()`,
every key with its type, default and meaning (the source of docs/config.md, `sm-dist config --reference`)."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from sm_dist.config.base import kinds, variants
from sm_dist.config.root import Config


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what the run logs and saves as `<run_dir>/config.yaml`)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _type_name(ann: Any) -> str:
    """A short, readable type for the reference: `int`, `float | null`, `"ddp" | "fsdp2"`, ..."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if members := variants(ann):
        return " \\| ".join(f"`{k}`" for v in members for k in kinds(v))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    return getattr(ann, "__name__", str(ann))


def _md_cell(text: str) -> str:
    """Text for a markdown table cell: `|` escaped, and `<` outside code spans (else `<bkspc>` would
    read as an HTML tag and vanish)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _default(field) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    shown = (
        "null"
        if default is None
        else yaml.safe_dump(default, default_flow_style=True, sort_keys=False).strip()
    )
    return "`" + shown.removesuffix("\n...").strip() + "`"


def _section(out: list[str], cls: type[BaseModel], prefix: str, title: str | None = None) -> None:
    """The table of `cls`'s keys, then the tables of its sections and union members, depth first."""
    nested: list[tuple[str, type[BaseModel], str | None]] = []
    rows = []
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((f"{prefix}{name}", ann, None))
            continue
        for v in variants(ann):  # a discriminated union: one section per member
            shown = " \\| ".join(kinds(v))
            nested.append((f"{prefix}{name}", v, f"`{prefix}{name}` with `kind: {shown}`"))
        text = _md_cell(f.description or "")
        rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | {_default(f)} | {text} |")
    if rows:
        head = title or "`" + prefix.rstrip(".") + "`"
        out.extend([f"## {head}", "", inspect.cleandoc(cls.__doc__ or ""), ""])
        out.extend(["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
    for name, sub, sub_title in nested:
        _section(out, sub, f"{name}.", sub_title)


def reference() -> str:
    """Every config key (dotted), with its type, default and description, as markdown: the source of
    `docs/config.md` and of `sm-dist config --reference`."""
    out = [
        "# Config reference",
        "",
        "Every key of a run config (`sm-dist train CONFIG key=value ...`), with its type, default and",
        "meaning. Generated from `sm_dist/config/` by `sm-dist config --reference`; do not edit by hand.",
        "",
    ]
    _section(out, Config, "")
    return "\n".join(out).rstrip() + "\n"
