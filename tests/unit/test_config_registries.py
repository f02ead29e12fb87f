"""The config's union kinds name exactly what the torch-side registries implement. The config imports
none of them (tests/unit/test_config_torch_free.py); this test does, so adding a divergence, a data
format, a noise kind or a transport on one side only fails here, naming the difference."""

from __future__ import annotations

import importlib

import pytest

from sm_dist.config import (
    VLLM_CPU_HEAD_SIZES,
    DataConfig,
    ObjectiveConfig,
    SyncConfig,
)
from sm_dist.config.base import kinds, variants


def _kinds(section, field: str) -> list[str]:
    return [k for v in variants(section.model_fields[field].annotation) for k in kinds(v)]


def test_divergences_are_the_objective_registry():
    from sm_dist.core.objective import DIVERGENCE_SPECS

    assert sorted(_kinds(ObjectiveConfig, "divergence")) == sorted(DIVERGENCE_SPECS)


@pytest.mark.parametrize("kind", list(_kinds(ObjectiveConfig, "divergence")))
def test_every_divergence_builds_the_objective_params(kind):
    """Each member's parameters are arguments of ObjectiveParams, and reach it."""
    o = ObjectiveConfig(divergence={"kind": kind}, gamma=0.9)
    p = o.params(bkspc_id=3)
    assert (p.divergence, p.gamma, p.bkspc_id) == (kind, 0.9, 3)
    for name, value in o.divergence.model_dump(exclude={"kind"}).items():
        assert getattr(p, name) == value, name


def test_data_formats_are_the_readers_registry():
    from sm_dist.data.sources import FORMATS

    assert sorted(_kinds(DataConfig, "format")) == sorted(["auto", *FORMATS])


def test_noise_kinds_are_the_ones_the_data_code_draws():
    from sm_dist.data.noise import KINDS

    assert sorted(_kinds(DataConfig, "noise")) == sorted(KINDS)


@pytest.mark.parametrize("transport", variants(SyncConfig.model_fields["transport"].annotation))
def test_every_transport_names_its_sender_and_receiver(transport):
    from sm_dist.sync.base import WeightReceiver, WeightSender

    module, sender, receiver = transport.ends
    mod = importlib.import_module(module)
    assert issubclass(getattr(mod, sender), WeightSender)
    assert issubclass(getattr(mod, receiver), WeightReceiver)


def test_head_sizes_mirror_the_tiny_model():
    from sm_dist.core.tiny import VLLM_CPU_HEAD_SIZES as CORE

    assert VLLM_CPU_HEAD_SIZES == CORE
