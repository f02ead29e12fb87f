"""Fixtures shared by the integration tests."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    """One in-process vLLM engine (CPU build) on the tiny model, shared by the rollout and eval tests:
    starting one costs ~10 s and ~1.7 GB. Tests must not change its weights."""
    from sm_dist.rollout.engine import BackspaceEngine

    eng = BackspaceEngine(tiny_model_dir, worker_extension_cls=None)
    yield eng
    del eng
    gc.collect()
