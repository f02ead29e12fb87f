"""Shared fixtures: a local Ray cluster bound to 127.0.0.1, temp dirs for Ray/vLLM caches, tiny models."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# vLLM's CPU build: set before any vllm import (PLATFORM.md).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    """One local Ray cluster for the whole session (2 CPUs, loopback only, own temp dir)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="smdist-ray-", dir="/tmp")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=tmp,
        runtime_env={
            "env_vars": {
                k: os.environ[k]
                for k in (
                    "VLLM_CPU_KVCACHE_SPACE",
                    "HF_HUB_OFFLINE",
                    "VLLM_ENABLE_V1_MULTIPROCESSING",
                    "VLLM_CACHE_ROOT",
                    "TORCHINDUCTOR_CACHE_DIR",
                    "TOKENIZERS_PARALLELISM",
                )
            }
        },
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)
