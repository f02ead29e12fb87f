"""The driver's side imports no ML stack: every module of `sm_dist.orchestrator` and `sm_dist.service`
imports in a process where torch, vLLM, transformers, peft and datasets cannot be imported (the learner
and rollout actors import them in their own processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import importlib.abc, json, pkgutil, sys
BLOCKED = {"torch", "vllm", "transformers", "peft", "datasets"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked by the torch-free test: {name}")
        return None

sys.meta_path.insert(0, Blocker())
import sm_dist.orchestrator, sm_dist.service
failed, seen = {}, []
for pkg in (sm_dist.orchestrator, sm_dist.service):
    for m in pkgutil.iter_modules(pkg.__path__):
        name = f"{pkg.__name__}.{m.name}"
        seen.append(name)
        try:
            __import__(name)
        except ImportError as e:
            failed[name] = str(e)
print(json.dumps({"seen": seen, "failed": failed}))
"""


def test_the_driver_side_imports_without_the_ml_stack():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "sm_dist.orchestrator.weight_sync" in got["seen"] and "sm_dist.service.api" in got["seen"]
    assert got["failed"] == {}
