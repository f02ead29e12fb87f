"""Rollout throughput and learner busy fraction with 1, 2 and 3 rollout workers, in one run: a service
run (`run.total_steps=null`) starts with one worker, is measured for `--window` seconds, scaled to 2
with `sm-dist ctl scale`, measured once the new worker has joined, and so on; then stopped.

Throughput: rollout actions landed per second over the window (from metrics.jsonl: each line's batch
count delta x its mean actions per batch). Learner busy: the learner's step seconds over the window.

    python benchmarks/scaling.py [--window 30] [--workers 1 2 3] [overrides ...]

Last line: `scaling_efficiency: X` = throughput with the most workers / (workers x throughput with one).
On a machine with few cores the workers share them, so X is low: the `cores:` line says how many.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def wait(pred, what: str, proc, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the run ended while waiting for {what}")
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    sys.exit(f"timed out waiting for {what}")


def measure(run: Path, window: float) -> dict:
    """The metric lines written during the next `window` seconds."""
    before = metrics(run)
    t0 = time.time()
    time.sleep(window)
    dt = time.time() - t0
    win = metrics(run)[len(before) :]
    batches = before[-1]["rollout/batches_total"] if before else 0.0
    actions = 0.0
    for r in win:
        if r.get("rollout/actions") is not None:
            actions += (r["rollout/batches_total"] - batches) * r["rollout/actions"]
        batches = r["rollout/batches_total"]
    busy = sum(r.get("perf/learner_step_s") or 0.0 for r in win)
    return {"tokens_per_s": actions / dt, "learner_busy": busy / dt, "steps": len(win)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=float, default=30.0, help="seconds measured at each size")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from sm_dist.service.ctl import call

    tmp = Path(tempfile.mkdtemp(prefix="sm-scale-"))
    run = tmp / "run"
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="smr-", dir="/tmp")}
    cpus = max(a.workers) * 0.5 + 1
    args = [sys.executable, "-m", "sm_dist", "train", str(ROOT / "configs" / "tiny-cpu.yaml"), f"run.run_dir={run}",
            "run.total_steps=null", "learner.schedule=constant", "run.progress=false",
            f"rollout.num_workers={a.workers[0]}", f"run.num_cpus={int(cpus + 0.999)}", "run.checkpoint_every=100000",
            *a.overrides]  # fmt: skip
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        wait(lambda: (run / "api.json").exists() and len(metrics(run)) > 20, "the first steps", proc)
        for n in a.workers:
            call(run, "scale", n)
            wait(lambda n=n: len(call(run, "status")["live"]["workers"]) == n, f"{n} workers", proc)
            time.sleep(5)  # the new worker's first batches
            results[n] = measure(run, a.window)
            r = results[n]
            print(f"workers {n}: rollout {r['tokens_per_s']:.0f} tokens/s, learner busy {100 * r['learner_busy']:.0f}% "
                  f"({r['steps']} steps in {a.window:.0f}s)", flush=True)  # fmt: skip
        call(run, "stop")
        proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(120)
    most, one = max(results), min(results)
    eff = results[most]["tokens_per_s"] / (most / one * results[one]["tokens_per_s"])
    print(f"cores: {os.cpu_count()}")
    print(f"scaling_efficiency: {eff:.3f}")


if __name__ == "__main__":
    main()
