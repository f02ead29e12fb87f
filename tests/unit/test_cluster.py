"""sm_dist.orchestrator.cluster: the local Ray stays on loopback whether or not Ray was imported first."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_CHECK = """
import os, sys
if sys.argv[1] == "ray-first":
    import ray
from sm_dist.orchestrator.cluster import _loopback_only, _restore
old = _loopback_only()
import ray
from ray._private import services  # what ray.init(_node_ip_address=...) consults
print(services.resolve_ip_for_localhost("127.0.0.1"))
_restore(old)
print(os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"))
"""


@pytest.mark.parametrize("order", ["ray-first", "sm-dist-first"])
def test_loopback_only_whether_or_not_ray_is_already_imported(order):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, order], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    ip, after = out.stdout.split()
    assert ip == "127.0.0.1" and after == "None"  # loopback kept; the env var put back for subprocesses
