"""`sm_dist.config.load_config` validates every shipped config in a process where torch, vLLM, Ray,
transformers, peft and datasets cannot be imported: a meta-path finder refuses them (and records the
attempt) before sm_dist is imported, so an import anywhere on the config path fails this test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "vllm", "ray", "transformers", "peft", "datasets")

CHILD = r"""
import importlib.abc, json, sys
BLOCKED = set(sys.argv[1].split(","))
tried = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"blocked by the torch-free test: {name}")
        return None

sys.meta_path.insert(0, Blocker())
from sm_dist.config import load_config
from sm_dist.errors import UserError

out = {}
for path in sys.argv[2:]:
    load_config(path, paths=False)  # the schema and every cross-section check
    try:  # the path checks too (hub ids, folders); cluster-only paths are absent here
        load_config(path, [f"run.run_dir={sys.argv[0]}-run"])
        out[path] = "ok"
    except UserError as e:  # ConfigError (key) or a hub id not in the cache (ModelError)
        out[path] = getattr(e, 'key', e.what)
print(json.dumps({"tried": tried, "loaded": out, "modules": [m for m in BLOCKED if m in sys.modules]}))
"""


def test_every_shipped_config_loads_with_the_ml_stack_blocked(tmp_path):
    configs = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = subprocess.run(
        [sys.executable, str(script), ",".join(BLOCKED), *configs],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tried"] == [] and got["modules"] == [], got
    loaded = got["loaded"]
    assert loaded[str(ROOT / "configs" / "tiny-cpu.yaml")] == "ok"  # its model and data ship in the repo
    assert set(loaded.values()) <= {"ok", "model.dir"}, loaded  # the others' models live on their cluster


def test_the_blocker_blocks():
    """The child's finder does refuse an import (else the test above would prove nothing)."""
    code = (
        CHILD.split("from sm_dist.config")[0]
        + "import json as _j\ntry:\n    import torch\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, "torch"], capture_output=True, text=True, timeout=60)
    assert "blocked by the torch-free test: torch" in out.stdout, out.stderr
