"""What every config section shares: `ConfigError`, the `Section` base (unknown keys forbidden), the
discriminated-union helpers (`variants`, `kinds`, `by_kind`) and the refusal of keys that moved."""

from __future__ import annotations

import types
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from sm_dist.errors import UserError

# vLLM's CPU build supports these attention head sizes (PLATFORM.md); mirrored from sm_dist.core.tiny
# so the config stays free of torch (tests/unit/test_config_registries.py checks they agree).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ConfigError(UserError):
    """A config problem: `key` is the dotted path, the message says what is wrong and how to fix it."""

    def __init__(self, key: str, message: str, fix: str = ""):
        super().__init__(f"config error at `{key}`", message, fix)
        self.key = key


class Section(BaseModel):
    """A config section: unknown keys are refused; `moved` maps a key of an older layout to
    (its dotted name, its new dotted name, the fix), so that layout fails in one line naming the new key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
    moved: ClassVar[dict[str, tuple[str, str, str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, (dotted, new, fix) in cls.moved.items():
                if old in data:
                    raise ValueError(f"{dotted}: this key moved to {new}. Fix: {fix}")
        return data


class Variant(BaseModel):
    """One member of a discriminated union, selected by its `kind` (a Literal field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def variants(ann: Any) -> list[type[BaseModel]]:
    """The member models of a union of pydantic models with a `kind` (a discriminated union), else []."""
    if typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) not in (typing.Union, types.UnionType):
        return []
    args = typing.get_args(ann)
    ok = all(isinstance(a, type) and issubclass(a, BaseModel) and "kind" in a.model_fields for a in args)
    return list(args) if ok else []


def kinds(model: type[BaseModel]) -> tuple[str, ...]:
    """The `kind` names a union member answers to (its Literal's values)."""
    return typing.get_args(model.model_fields["kind"].annotation)


def variant_of(ann: Any, kind: str) -> type[BaseModel] | None:
    return next((v for v in variants(ann) if kind in kinds(v)), None)


def by_kind(key: str, union: Any):
    """A field validator for the union field `key` (dotted): an unknown or missing kind, or a bare
    name in place of the mapping, is refused in one line listing the kinds there are."""
    names = [k for v in variants(union) for k in kinds(v)]

    def check(value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                f"{key}: {value!r} is a bare name; a variant is a mapping with its kind. Fix: "
                f"{key}: {{kind: {value}}} in the file, or {key}.kind={value} on the command line"
            )
        if isinstance(value, dict):
            if "kind" not in value:
                raise ValueError(
                    f"{key}: needs a kind, one of {names}. Fix: e.g. {key}: {{kind: {names[0]}}}"
                )
            if value["kind"] not in names:
                raise ValueError(f"{key}: {value['kind']!r} is not one of {names}. Fix: use one of them")
        return value

    return field_validator(key.rsplit(".", 1)[-1], mode="before")(check)
