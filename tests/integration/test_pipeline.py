"""End to end: `sm-dist train` on the tiny config (local Ray in a subprocess), and resume after SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sm_dist.learner.sharded import read_all

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
FAST = ["run.progress=false", "objective.warmup_steps=10", "sync.every=4", "run.checkpoint_every=10"]
NO_HELDOUT = "run.eval_path=null"  # for runs that do not check the held-out accuracy: ~10 s less a start


@pytest.fixture
def ray_tmp():
    """A short Ray temp dir (AF_UNIX socket paths are capped at 107 bytes)."""
    d = tempfile.mkdtemp(prefix="smr-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(tmp_path: Path, ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, VLLM_CACHE_ROOT=str(tmp_path / "vllm"))
    return env


def train_cmd(run: Path, *overrides: str) -> list[str]:
    """`python -m sm_dist train` of the tiny config with FAST's settings, into `run`."""
    return [sys.executable, "-m", "sm_dist", "train", TINY, *FAST, f"run.run_dir={run}", *overrides]


def _metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def _start(tmp_path: Path, ray_tmp: str, args: list[str]) -> subprocess.Popen:
    """`sm-dist train` in the background, stdout and stderr together (read with `communicate`)."""
    return subprocess.Popen(
        args,
        env=_env(tmp_path, ray_tmp),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


COLLECTIVE_FSDP2 = [
    "sync.transport.kind=gloo",
    "learner.num_learners=2",
    "learner.strategy=fsdp2",
    "learner.cpus_per_learner=0.5",
    "buffer.fill_with_data=false",
    "rollout.correction_rows=true",
    "model.start_from=null",  # from scratch: the correction rows of a capable base raise its BC loss
    "buffer.shards=2",  # one replay shard per learner rank: each rank samples its own (w0, w1 hash apart)
]


@pytest.mark.parametrize("extra", [[], COLLECTIVE_FSDP2], ids=["object_store", "gloo-fsdp2"])
def test_tiny_run_loss_falls_and_every_worker_syncs(tmp_path, ray_tmp, extra):
    """The default run, and the collective path: 2 FSDP2 learner ranks gather the weights and rank 0
    broadcasts them over gloo to threaded workers (the CPU stand-in for the NCCL transport); the
    second also holds the expert rows per step fixed (buffer.fill_with_data=false), turns the
    workers' own mistakes into expert rows (rollout.correction_rows) and splits the replay buffer into
    2 shards, one per rank (buffer.shards=2)."""
    run = tmp_path / "run"
    args = [
        *train_cmd(run, "run.total_steps=40"),
        *extra,
    ]
    out = subprocess.run(
        args, env=_env(tmp_path, ray_tmp), capture_output=True, text=True, timeout=400, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m = _metrics(run)
    assert [r["step"] for r in m] == list(range(1, 41))
    bc = [r["loss/bc"] for r in m]
    assert sum(bc[-8:]) / 8 < sum(bc[:8]) / 8, bc
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["syncs_applied"]) == {"w0", "w1"}
    assert min(summary["syncs_applied"].values()) >= 2, summary["syncs_applied"]
    assert any(r["learner/replay_rows"] > 0 for r in m)  # SequenceMatch steps used rollouts
    if "rollout.correction_rows=true" in extra:  # the workers' own mistakes became expert rows
        from sm_dist.buffer import read_run_buffer

        corr = [r for r in read_run_buffer(run / "expert").to_pylist() if "-corr-" in r["sample_id"]]
        assert corr and all(r["source"] == "data" and sum(r["is_noise"]) == 1 for r in corr)
        assert any(r.get("rollout/correction_rows", 0) > 0 for r in m)
    if "buffer.shards=2" in extra:  # both workers' shards got rows, and the summary counts both
        from sm_dist.buffer import read_run_buffer

        assert all(read_run_buffer(run, shard=k).num_rows > 0 for k in (0, 1))
        assert [s["added_rows"] > 0 for s in summary["buffer"]["shards"]] == [True, True], summary["buffer"]
    ranks = 2 if "learner.num_learners=2" in extra else 1  # the row counts are per rank
    if "buffer.fill_with_data=false" in extra:  # expert rows per step fixed; rollouts come on top
        assert {r["learner/data_rows"] * ranks for r in m} == {48.0}, [r["learner/data_rows"] for r in m]
    else:  # missing rollout rows are filled with data rows
        assert {(r["learner/data_rows"] + r["learner/replay_rows"]) * ranks for r in m} == {64.0}
    assert (run / "checkpoints" / "step-00000040" / "model" / "config.json").exists()
    h = summary["heldout"]  # run.eval_path of the tiny config: the bundled held-out split, on the workers
    assert h["n"] == 300 and 0.0 <= h["before"] <= 1.0 and 0.0 <= h["after"] <= 1.0, h
    assert h["before_version"] == 0 and h["after_version"] == summary["version"], h
    last = out.stdout.splitlines()[-1].strip()  # the end summary's last line
    assert last.startswith(f"held-out accuracy: {h['before']:.3f} → {h['after']:.3f}"), last
    if not extra:  # `sm-dist eval` on the run directory: its newest checkpoint, the run's caps, JSON alone
        ev = [
            sys.executable,
            "-m",
            "sm_dist",
            "eval",
            "--model",
            str(run),
            "--data",
            h["path"],
            "--limit",
            "8",
        ]
        js = subprocess.run(
            [*ev, "--json"], env=_env(tmp_path, ray_tmp), capture_output=True, text=True, timeout=600
        )
        assert js.returncode == 0, js.stderr[-2000:]
        res = json.loads(js.stdout)
        assert res["model"] == str(run / "checkpoints" / "step-00000040" / "model") and res["n"] == 8
        assert (res["max_actions_cap"], res["max_backspaces_cap"]) == (24, 4)  # the run's rollout caps
    assert "run dir:" in out.stdout and str(run) in out.stdout
    assert "resolved config" in (run / "driver.log").read_text()  # DEBUG in the file, not the console
    assert "max_staleness:" not in out.stderr  # the YAML itself is not on the console
    assert (run / "workers.log").stat().st_size > 0  # the actors' vLLM/Ray output, off the console
    console = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert len(console) <= 20, "\n".join(console)
    from sm_dist.service.status import run_status

    st = run_status(run)  # the driver released the run dir on its way out
    assert st["state"] == "finished" and st["step"] == 40 and st["driver"] is None


def _listening(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listening in `root_pid`'s process tree."""
    import psutil

    root = psutil.Process(root_pid)
    tree = {root.pid: root.name()} | {p.pid: p.name() for p in root.children(recursive=True)}
    return [
        (c.laddr.ip, c.laddr.port, tree[c.pid])
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in tree
    ]


def _loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_resume_after_sigterm_continues(tmp_path, ray_tmp):
    """One run dir, four starts (the phases share it, and their Ray/vLLM start-ups, to keep the suite
    short):
    0. kill -9 of the replay buffer actor: the run stops non-zero with a clear message and a checkpoint
       of the step it reached.
    1. `--resume` (the config file given again, overrides on top) restores the buffer from its segments
       and goes on as a service run (run.total_steps=null) on the local Ray that `sm-dist train` starts:
       every listening socket of its process tree (GCS, raylet, object manager, agents, actors, driver)
       is on loopback (issue 12); SIGTERM ends it with a final checkpoint of the step k it reached.
    2. `--resume` with no config and a step count goes on from exactly step k.
    3. The newest checkpoint corrupted (a half-written weights file): `--resume` goes on from the previous
       intact one, keeps the corrupt one as it was (`step-N.corrupt`), and the history holds
       every step once (the abandoned attempt's rows are set aside in metrics.abandoned.jsonl)."""
    run = tmp_path / "run"
    base = [sys.executable, "-m", "sm_dist", "train", TINY, *FAST, "learner.schedule=constant", NO_HELDOUT]
    k0, on_disk = _dead_replay_buffer_stops_with_checkpoint(tmp_path, ray_tmp, run, base)
    first, state = _resume_then_sigterm(tmp_path, ray_tmp, run, base, k0, on_disk)
    k = first["step"]
    _resume_goes_on_from_k(tmp_path, ray_tmp, run, first, state)
    _resume_past_a_corrupt_checkpoint(tmp_path, ray_tmp, run, k)


def _dead_replay_buffer_stops_with_checkpoint(tmp_path, ray_tmp, run: Path, base: list[str]):
    """Phase 0: kill -9 of the replay buffer actor. Returns (the step k0 it reached, the rows on disk)."""
    args = [*base, f"run.run_dir={run}", "run.total_steps=null", "run.checkpoint_every=1000"]
    proc = _start(tmp_path, ray_tmp, args)  # no periodic checkpoint: the one saved is the rescue one
    try:
        _wait(lambda: (m := _metrics(run)) and m[-1].get("rollout/batches_total", 0) >= 4, "rollouts", proc)
        pids = _wait(lambda: _actor_pids(ray_tmp, "ReplayBuffer"), "the buffer actors", proc)
        # the replay buffer is the first ReplayBuffer actor created (the expert buffer is the second)
        os.kill(min(pids), signal.SIGKILL)
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, log[-3000:]
    k0 = _metrics(run)[-1]["step"]
    assert re.search(r"the run failed at step \d+: .*\[dead actor: ReplayBuffer\]", log), log[-3000:]
    assert f"saved checkpoint {run / 'checkpoints' / f'step-{k0:08d}'}" in log, log[-3000:]
    from sm_dist.buffer import read_run_buffer

    on_disk = read_run_buffer(run).num_rows
    assert on_disk > 0
    return k0, on_disk


def _resume_then_sigterm(tmp_path, ray_tmp, run: Path, base: list[str], k0: int, on_disk: int):
    """Phase 1: the resumed service run, its sockets, SIGTERM. Returns (summary.json, run_state.json of
    its final checkpoint)."""
    proc = _start(tmp_path, ray_tmp, [*base, "run.total_steps=null", "--resume", str(run)])
    try:
        _wait(lambda: (m := _metrics(run)) and m[-1]["step"] >= 24, "step 24", proc)
        sockets = _listening(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, log[-3000:]
    assert f"at step {k0}" in log, log[-3000:]  # resumed from the rescue checkpoint
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the tree was found: the check is not vacuous
    assert any(n.startswith("ray::RolloutWorker") for n in names), sockets
    exposed = [s for s in sockets if not _loopback(s[0])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    first = json.loads((run / "summary.json").read_text())
    k = first["step"]
    assert first["stopped_early"] and k >= 24
    assert first["buffer"]["added_rows"] >= on_disk  # the replay buffer was restored from its segments
    last = Path(first["last_checkpoint"])
    assert last.name == f"step-{k:08d}"
    state = json.loads((last / "run_state.json").read_text())
    assert state["step"] == k
    opt = read_all(last / "state")["optim"]  # the ranks' DCP shards, read without unpickling code
    adam_steps = {float(s["step"]) for s in opt["state"].values()}
    assert adam_steps == {float(k)}  # no skipped steps: one Adam step per learner step
    return first, state


def _resume_goes_on_from_k(tmp_path, ray_tmp, run: Path, first: dict, state: dict) -> None:
    """Phase 2: no config, the run's saved one (a service run, FAST settings) with one override on top."""
    k, last = first["step"], Path(first["last_checkpoint"])
    resume = [sys.executable, "-m", "sm_dist", "train", "--resume", str(run)]
    out = subprocess.run(
        [*resume, f"run.total_steps={k + 8}"], env=_env(tmp_path, ray_tmp), cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {last} at step {k}" in out.stderr  # the log (stderr); the summary is stdout
    assert (run / "resumed-model" / "config.json").exists()  # actors start on the pinned copy
    steps = [r["step"] for r in _metrics(run)]
    assert steps[-8:] == list(range(k + 1, k + 9))  # the step counter continues
    second = json.loads((run / "summary.json").read_text())
    assert second["step"] == k + 8 and second["version"] >= state["version"]
    assert second["buffer"]["added_rows"] >= first["buffer"]["added_rows"]  # restored, then grew
    opt2 = read_all(Path(second["last_checkpoint"]) / "state")["optim"]
    assert {float(s["step"]) for s in opt2["state"].values()} == {float(k + 8)}


def _resume_past_a_corrupt_checkpoint(tmp_path, ray_tmp, run: Path, k: int) -> None:
    """Phase 3: the newest checkpoint half-written: back to the previous intact one."""
    ckpts = run / "checkpoints"
    before = sorted(p.name for p in ckpts.iterdir())
    newest, prev = before[-1], before[-2]
    assert newest == f"step-{k + 8:08d}", before
    j = int(prev.removeprefix("step-"))
    redone = [r["step"] for r in _metrics(run) if r["step"] > j]  # the rows a resume from j sets aside
    aside = run / "metrics.abandoned.jsonl"
    aside_before = aside.read_text().splitlines() if aside.exists() else []
    weights = ckpts / newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    corrupt_bytes = weights.read_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "train", "--resume", str(run), f"run.total_steps={k + 12}"],
        env=_env(tmp_path, ray_tmp), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    kept = ckpts / f"{newest}.corrupt"
    assert f"checkpoint {newest} is corrupt (model/model.safetensors has" in out.stderr, out.stderr[-3000:]
    assert f"kept as {kept}; resuming from {prev}" in out.stderr, out.stderr[-3000:]
    assert f"resumed from {ckpts / prev} at step {j}" in out.stderr
    assert (kept / "model" / "model.safetensors").read_bytes() == corrupt_bytes  # kept as it was
    assert [r["step"] for r in _metrics(run)] == list(range(1, k + 13))  # redone from j, not twice
    abandoned = [json.loads(x)["step"] for x in aside.read_text().splitlines()[len(aside_before) :]]
    assert abandoned == redone == list(range(j + 1, k + 9)), (aside_before, redone)  # set aside, once
    third = json.loads((run / "summary.json").read_text())
    assert third["step"] == k + 12
    opt3 = read_all(Path(third["last_checkpoint"]) / "state")["optim"]
    assert {float(s["step"]) for s in opt3["state"].values()} == {float(k + 12)}


def _actor_pids(ray_tmp: str, cls: str) -> set[int]:
    pids = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not (d / "cmdline").read_bytes().startswith(f"ray::{cls}".encode()):
                continue
            if f"RAY_TMPDIR={ray_tmp}".encode() in (d / "environ").read_bytes().split(b"\0"):
                pids.add(int(d.name))
        except OSError:
            continue
    return pids


def _rollout_worker_pids(ray_tmp: str) -> set[int]:
    """PIDs of this run's RolloutWorker processes (their environment carries the run's RAY_TMPDIR)."""
    return _actor_pids(ray_tmp, "RolloutWorker")


def _wait(pred, what: str, proc, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended while waiting for {what}: {proc.stdout.read()[-3000:]}")
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
