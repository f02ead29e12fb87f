"""Shared fixtures: a local Ray cluster bound to 127.0.0.1, temp dirs for Ray/vLLM caches, tiny models."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from sm_dist.orchestrator.cluster import init_local_ray, set_process_env, vllm_env

set_process_env()  # vLLM's CPU build: before any vllm import (PLATFORM.md)

_CACHE = Path(tempfile.mkdtemp(prefix="smdist-cache-"))
os.environ.setdefault("VLLM_CACHE_ROOT", str(_CACHE / "vllm"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_CACHE / "inductor"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 128, 2 heads of 64, 2 layers) with a char-level arithmetic tokenizer."""
    from sm_dist.core.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (4 logical CPUs, loopback only, own temp dir)."""
    tmp = tempfile.mkdtemp(prefix="smdist-ray-", dir="/tmp")
    caches = {k: os.environ[k] for k in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR")}
    ray = init_local_ray(num_cpus=4, env=vllm_env(**caches), temp_dir=tmp)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)
