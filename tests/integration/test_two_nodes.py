"""A two-node Ray cluster on this machine, driven the way the README's plain-cluster walk-through does it:
`deploy/submit.sh` (`ray job submit --working-dir . -- python -m sm_dist train ...`) against a head on
127.0.0.1 started with `ray start` (token auth on, no kubectl), and a second node on 127.0.0.2 (Linux
routes all of 127/8 to loopback) that alone carries the custom resource `learner_node`. With
`learner.resources={learner_node: 1}` the learner ranks' placement group lands there, so their process
group must meet at rank 0's node, 127.0.0.2, not at the driver's node (the job's entrypoint, on the head).
One cluster and one run for both (they were two tests, each with its own cluster and run).

Both nodes run as `ray start --block` children of this test, each in its own process group, and are
stopped by signalling those groups (never `ray stop`, which would stop other sessions' Ray too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from sm_dist.orchestrator.cluster import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")


def _ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # ray 2.60 `ray start` enables token auth (PLATFORM.md): join with it
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


class EarlyExit(AssertionError):
    """A `ray start` exited before its node was up."""


@contextmanager
def two_nodes(head_cpus: int = 2, node_cpus: int = 2, learner_slots: int = 2, attempts: int = 2):
    """Yield the head's job API address once both nodes are up; stop both on the way out. A `ray start` that
    exits early (e.g. a port taken between choosing it and binding it) is retried on fresh ports once;
    its output is in the error otherwise."""
    for attempt in range(attempts):
        tmp = tempfile.mkdtemp(prefix="smn-", dir="/tmp")  # short: AF_UNIX socket paths are capped
        procs: list[subprocess.Popen] = []
        try:
            address = _bring_up(tmp, procs, head_cpus, node_cpus, learner_slots)
        except EarlyExit:
            _stop(procs[::-1])
            shutil.rmtree(tmp, ignore_errors=True)
            if attempt + 1 == attempts:
                raise
            continue
        try:
            yield address
        finally:
            _stop(procs[::-1])
            shutil.rmtree(tmp, ignore_errors=True)
        return


def _bring_up(tmp: str, procs: list, head_cpus: int, node_cpus: int, learner_slots: int) -> str:
    port, env = free_port(), _ray_env()

    def start(*args: str) -> None:
        log = open(Path(tmp) / f"ray-start-{len(procs)}.log", "w")  # noqa: SIM115 (closed with the dir)
        procs.append(
            subprocess.Popen(
                [
                    "ray",
                    "start",
                    "--block",
                    "--temp-dir",
                    tmp,
                    "--dashboard-agent-listen-port",
                    str(free_port()),
                    *args,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )

    dash = free_port()  # the job API; its own agent port (start's): another Ray may hold the default one
    start("--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host", "127.0.0.1",
          "--dashboard-port", str(dash), "--num-cpus", str(head_cpus))  # fmt: skip
    address = f"127.0.0.1:{port}"
    _wait_nodes(address, env, 1, procs, tmp)
    start("--address", address, "--node-ip-address", "127.0.0.2", "--num-cpus", str(node_cpus),
          "--resources", json.dumps({"learner_node": learner_slots}))  # fmt: skip
    _wait_nodes(address, env, 2, procs, tmp)
    jobs = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while subprocess.run(["ray", "job", "list", "--address", jobs], env=env, capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise AssertionError(f"the job API at {jobs} did not answer within 120s")
        time.sleep(2)
    return jobs


def _wait_nodes(address: str, env: dict, n: int, procs: list, tmp: str, timeout_s: float = 180) -> None:
    """Until `n` nodes are alive (asked from a fresh process: a driver here would hold the cluster)."""
    probe = (
        "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
        if dead:
            tail = (Path(tmp) / f"ray-start-{dead[0]}.log").read_text()[-2000:]
            raise EarlyExit(f"ray start #{dead[0]} exited early (exit {procs[dead[0]].returncode}):\n{tail}")
        out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise AssertionError(f"{n} Ray nodes not up at {address} after {timeout_s}s")


def _submit(args: list[str], run: Path, env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """`deploy/submit.sh ARGS` in its own process group; past `timeout_s` the group is killed and the
    error carries the tails of driver.log and workers.log (what the run was waiting for)."""
    p = subprocess.Popen(["bash", "deploy/submit.sh", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=60)
        tails = {
            n: (run / n).read_text()[-3000:] for n in ("driver.log", "workers.log") if (run / n).exists()
        }
        raise AssertionError(
            f"the job still running after {timeout_s}s; output:\n{out[-3000:]}\n"
            + "\n".join(f"--- {n}:\n{t}" for n, t in tails.items())
        ) from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def test_a_submitted_job_trains_with_learners_on_the_second_node(tmp_path):
    run = tmp_path / "run"
    env = _ray_env()
    # the plain-cluster path: kubectl never called, no RAY_AUTH_TOKEN; the token is the one
    # `ray start --head` wrote to ~/.ray/auth_token
    assert "RAY_AUTH_TOKEN" not in env
    shim = tmp_path / "bin"  # a kubectl that records any call: the plain-cluster path must make none
    shim.mkdir()
    (shim / "kubectl").write_text(f"#!/bin/sh\necho called >> {tmp_path / 'kubectl-calls'}\nexit 1\n")
    (shim / "kubectl").chmod(0o755)
    with two_nodes() as jobs:
        t0 = time.monotonic()
        # the run's own deadlines sit inside the test's, so a stuck start-up or sync fails naming what was late
        out = _submit(
            ["configs/tiny-cpu.yaml", f"run.run_dir={run}", "run.total_steps=8", "run.checkpoint_every=4",
             "objective.warmup_steps=4", "sync.every=4", "run.progress=false", "learner.num_learners=2",
             "learner.cpus_per_learner=0.5", "learner.batch_size=16", "learner.resources={learner_node: 1}",
             "run.startup_timeout_s=300", "sync.timeout_s=120", "run.eval_path=null"],
            run, {**env, "RAY_DASHBOARD": jobs, "PATH": f"{shim}{os.pathsep}{env.get('PATH', '')}"}, timeout_s=600,
        )  # fmt: skip
        took = time.monotonic() - t0
    assert not (tmp_path / "kubectl-calls").exists()
    assert out.returncode == 0 and "succeeded" in out.stdout, out.stdout[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 8, summary
    addr, _, port = summary["learner_rendezvous"].rpartition(":")
    assert addr == "127.0.0.2" and int(port) > 0, summary  # rank 0's node, the learners' own
    assert summary["driver_node"] != "127.0.0.2", summary  # the job's driver stayed on the head
    log = (run / "driver.log").read_text()
    assert f"learner ranks rendezvous at {summary['learner_rendezvous']}" in log
    # the bundled sample travels with --working-dir: the real data was used, nothing generated
    assert not list((run / "data").glob("*.generated.jsonl"))
    assert "configs/data/arith/add_or_sub_in_base.train-easy.jsonl" in (run / "config.yaml").read_text()
    print(
        f"two-node job: {took:.0f}s; rendezvous {summary['learner_rendezvous']}, driver {summary['driver_node']}"
    )
