"""Run-directory ownership (one live driver per run dir) and `sm-dist status` from a run's files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sm_dist.learner import checkpoint as ckpt
from sm_dist.service.status import (
    DRIVER_FILE,
    RunDirBusy,
    claim_run_dir,
    format_status,
    release_run_dir,
    run_status,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def other_process():
    """A live process that is not this one (stands in for another driver)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _hold(run_dir: Path, pid: int, host: str | None = None) -> None:
    info = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (run_dir / DRIVER_FILE).write_text(json.dumps(info))


def test_a_live_driver_keeps_the_run_dir_and_a_dead_one_is_taken_over(tmp_path, other_process):
    _hold(tmp_path, other_process.pid)
    with pytest.raises(RunDirBusy, match=f"pid {other_process.pid}"):
        claim_run_dir(tmp_path)
    _hold(tmp_path, other_process.pid, host="some-other-node")  # cannot be checked from here: kept
    with pytest.raises(RunDirBusy, match="some-other-node"):
        claim_run_dir(tmp_path)
    _hold(tmp_path, other_process.pid)
    other_process.kill()
    other_process.wait()
    claim_run_dir(tmp_path)  # stale: its driver is gone
    assert json.loads((tmp_path / DRIVER_FILE).read_text())["pid"] == os.getpid()
    claim_run_dir(tmp_path)  # the same driver again (e.g. a retry) is fine
    release_run_dir(tmp_path)
    assert not (tmp_path / DRIVER_FILE).exists()


_CLAIMER = """
import json, os, sys, time
from pathlib import Path
from sm_dist.service import status
from sm_dist.service.status import RunDirBusy, claim_run_dir, release_run_dir
run, me = Path(sys.argv[1]), sys.argv[2]
write = status._write_driver
status._write_driver = lambda *a: (time.sleep(0.3), write(*a))  # a slow shared filesystem
(run / f"ready-{me}").touch()
while not (run / "go").exists():
    time.sleep(0.001)
try:
    claim_run_dir(run)
except RunDirBusy as e:
    print(json.dumps({"busy": str(e)}), flush=True)
    sys.exit(0)
print(json.dumps({"won": os.getpid()}), flush=True)
while not (run / "done").exists():
    time.sleep(0.01)
release_run_dir(run)
"""


def test_drivers_racing_for_one_run_dir_let_exactly_one_in(tmp_path):
    """Four drivers claim one run dir at the same instant, each writing driver.json slowly (a check
    then a write would let several in): the lock lets one in; each of the others gets one line naming
    the run dir and the winner's pid. Once it releases, the dir is free again."""
    n = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, str(tmp_path), str(i)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(n)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        (tmp_path / "go").touch()
        busy = [json.loads(p.stdout.readline()) for p in procs]
        winners = [b["won"] for b in busy if "won" in b]
        assert len(winners) == 1, busy
        for b in busy:
            if "busy" in b:
                assert "\n" not in b["busy"] and str(tmp_path) in b["busy"]
                assert f"in use by another sm-dist train (pid {winners[0]} on" in b["busy"]
        assert json.loads((tmp_path / DRIVER_FILE).read_text())["pid"] == winners[0]
        (tmp_path / "done").touch()
        assert all(p.wait(timeout=30) == 0 for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert not (tmp_path / DRIVER_FILE).exists()
    claim_run_dir(tmp_path)  # the winner's lock went with it
    release_run_dir(tmp_path)


def test_a_held_lock_refuses_even_without_driver_json(tmp_path):
    """The lock alone keeps a run dir: a holder that has not written driver.json yet still wins."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(tmp_path / "driver.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match="in use by another sm-dist train"):
            claim_run_dir(tmp_path)
        assert not (tmp_path / DRIVER_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    claim_run_dir(tmp_path)  # a killed holder's lock is gone with it
    release_run_dir(tmp_path)


def _run_dir(tmp_path: Path, steps: int) -> Path:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"run": {"total_steps": 100}}))
    lines = [
        {"step": s, "time": 0.5 * s, "loss/total": 10.0 - s * 0.1, "loss/bc": 5.0, "sync/version": s // 5}
        for s in range(1, steps + 1)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp = ckpt.begin(tmp_path, 20)
    ckpt.commit(tmp, {"step": 20}, tmp_path, keep_last=2)
    (tmp_path / "buffer").mkdir()
    (tmp_path / "buffer" / "manifest.json").write_text(json.dumps({"added_rows": 640, "evicted_rows": 16}))
    return tmp_path


def test_status_of_a_running_a_dead_and_a_finished_run(tmp_path, other_process):
    run = _run_dir(tmp_path, steps=24)
    _hold(run, other_process.pid)
    st = run_status(run)
    assert st["state"] == "running" and st["step"] == 24 and st["total_steps"] == 100
    assert st["steps_per_s"] == pytest.approx(2.0) and st["weights_version"] == 4
    assert st["loss_total"] == pytest.approx(sum(10.0 - s * 0.1 for s in range(15, 25)) / 10)
    assert st["last_checkpoint"].endswith("step-00000020")
    assert (st["buffer_added_rows"], st["buffer_evicted_rows"]) == (640, 16)
    text = format_status(st)
    assert "running (pid" in text and "24 of 100" in text and "step-00000020" in text

    other_process.kill()
    other_process.wait()
    st = run_status(run)
    assert st["state"] == "died" and "--resume" in format_status(st)
    assert f"stale driver.json: pid {other_process.pid}" in format_status(st)

    (run / DRIVER_FILE).unlink()
    (run / "summary.json").write_text(json.dumps({"stopped_early": False, "step": 24}))
    assert run_status(run)["state"] == "finished"


def test_cli_status_and_a_refused_second_driver(tmp_path, other_process):
    (tmp_path / "run").mkdir()
    run = _run_dir(tmp_path / "run", steps=3)
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "status", str(run), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["step"] == 3
    _hold(run, other_process.pid)
    train = [
        sys.executable,
        "-m",
        "sm_dist",
        "train",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        f"run.run_dir={run}",
    ]
    out = subprocess.run(train, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert (
        "run.run_dir" in out.stderr
        and f"in use by another sm-dist train (pid {other_process.pid}" in out.stderr
    )
    assert json.loads((run / DRIVER_FILE).read_text())["pid"] == other_process.pid  # left as it was


def test_a_dead_drivers_leftover_processes_are_stopped_by_the_next_claim(tmp_path):
    """kill -9 of a driver leaves its local Ray running; the next driver on the run dir stops the
    processes the dead one recorded (same pid and start time), and nothing else."""
    import json
    import socket
    import subprocess
    import sys

    import psutil

    from sm_dist.service.status import DRIVER_FILE, claim_run_dir, release_run_dir

    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the killed driver
    try:
        started = psutil.Process(left.pid).create_time()
        info = {"pid": dead.pid, "host": socket.gethostname(), "started": "x",
                "children": [[left.pid, started], [other.pid, started - 1000.0]]}  # other: a reused pid  # fmt: skip
        (tmp_path / DRIVER_FILE).write_text(json.dumps(info))
        claim_run_dir(tmp_path)
        assert left.wait(timeout=10) != 0  # stopped
        assert other.poll() is None  # a different process under a recorded pid is left alone
        assert json.loads((tmp_path / DRIVER_FILE).read_text())["pid"] != dead.pid
        release_run_dir(tmp_path)
    finally:
        for p in (left, other):
            p.kill()
