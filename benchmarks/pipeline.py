"""Pipeline benchmark on the tiny config: asynchronous (workers generate while learners step) vs
synchronous (generate, then learn, alternating), each a real `sm-dist train` run in its own local Ray.

Reports rollout-worker busy % and learner busy % (time spent generating / stepping over wall time, from
the last metrics line of each run) and learner steps per second; the last line is
`async_over_sync: X`, the ratio of steps/s. A ratio measured in one run, not a timed test.

    python benchmarks/pipeline.py [--steps 60] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sm_dist.service.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, steps: int, extra: list[str], tmp: Path) -> dict:
    run_dir = tmp / mode
    ray_tmp = tempfile.mkdtemp(prefix="smb-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    args = [
        sys.executable, "-m", "sm_dist", "train", str(ROOT / "configs" / "tiny-cpu.yaml"),
        f"run.run_dir={run_dir}", f"run.total_steps={steps}", "run.progress=false",
        f"run.asynchronous={'true' if mode == 'async' else 'false'}", "run.checkpoint_every=100000", *extra,
    ]  # fmt: skip
    try:
        subprocess.run(
            args, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = read_metrics(run_dir)
    first, last = lines[0], lines[-1]
    span = max(1e-9, last["time"] - first["time"])  # excludes start-up (engines, model load)
    return {
        "steps_per_s": (last["step"] - first["step"]) / span,
        "learner_busy": last["perf/learner_busy"],
        "rollout_busy": last["perf/rollout_busy"],
        "rollout_batches": last["rollout/batches_total"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("overrides", nargs="*", help="config overrides for both runs")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sm-bench-") as d:
        res = {mode: run(mode, a.steps, a.overrides, Path(d)) for mode in ("sync", "async")}
    for mode, r in res.items():
        print(
            f"{mode:5s}: {r['steps_per_s']:.2f} steps/s, rollout busy {100 * r['rollout_busy']:.0f}%, "
            f"learner busy {100 * r['learner_busy']:.0f}%, {r['rollout_batches']:.0f} rollout batches"
        )
    print(f"async_over_sync: {res['async']['steps_per_s'] / res['sync']['steps_per_s']:.2f}")


if __name__ == "__main__":
    main()
