"""`deploy/submit.sh` (`ray job submit --working-dir . -- python -m sm_dist train ...`) against a plain
head started with `ray start` (token auth on, no kubectl).

The head runs as `ray start --head --block`, a child of this test, and is stopped by signalling that
process group (not `ray stop`, which would stop every Ray on the machine, other sessions' included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sm_dist.orchestrator.cluster import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_tiny_config(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="smj-", dir="/tmp")
    port, dash, agent = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    # Own agent port: the session's local Ray (other tests) already holds the default one (52365), and
    # a head whose dashboard agent cannot bind answers every submit with "No available agent".
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--port", str(port), "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
         "--num-cpus", "3", "--temp-dir", ray_tmp],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    run = tmp_path / "run"
    try:
        addr = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ok = subprocess.run(["ray", "job", "list", "--address", addr], env=env, capture_output=True)
            if ok.returncode == 0:
                break
            time.sleep(2)
        # through deploy/submit.sh, as the README's plain-cluster walk-through does: kubectl never called, no
        # RAY_AUTH_TOKEN; the token is the one `ray start --head` wrote to ~/.ray/auth_token
        assert "RAY_AUTH_TOKEN" not in env
        shim = tmp_path / "bin"  # a kubectl that records any call: the plain-cluster path must make none
        shim.mkdir()
        (shim / "kubectl").write_text(f"#!/bin/sh\necho called >> {tmp_path / 'kubectl-calls'}\nexit 1\n")
        (shim / "kubectl").chmod(0o755)
        path = f"{shim}{os.pathsep}{env.get('PATH', '')}"
        out = subprocess.run(
            ["bash", "deploy/submit.sh", "configs/tiny-cpu.yaml", f"run.run_dir={run}",
             "run.total_steps=12", "objective.warmup_steps=4", "sync.every=4", "run.progress=false", "run.eval_path=null"],
            env={**env, "RAY_DASHBOARD": addr, "PATH": path}, cwd=ROOT, capture_output=True, text=True,
            timeout=400,
        )  # fmt: skip
        assert not (tmp_path / "kubectl-calls").exists()
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert "succeeded" in out.stdout
        summary = json.loads((run / "summary.json").read_text())
        assert summary["step"] == 12
        # the bundled sample travels with --working-dir: the real data was used, nothing generated
        assert not list((run / "data").glob("*.generated.jsonl"))
        assert "configs/data/arith/add_or_sub_in_base.train-easy.jsonl" in (run / "config.yaml").read_text()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
