"""Before and after a change, in one interleaved run: each benchmark runs from a checkout of `--base`
(a git revision: the code before) and from this tree (after), alternately (base, head, then head, base in
the next round, ...), so both sides see the same machine load. Every `name: value` line a benchmark
prints is collected, plus the busy fractions `benchmarks/pipeline.py` prints in words; per figure the
median of each side and their ratio (after / before) are printed.

    python benchmarks/before_after.py --base 2497ad9 --rounds 2
    python benchmarks/before_after.py --base HEAD~5 --only rollout --rounds 3

Benchmarks (each with small arguments, run as its own process with the side's tree first on PYTHONPATH):
pipeline (async_over_sync, learner/rollout busy), weight_sync (sync_over_roundtrip), rollout
(bkspc_gen_over_plain_gen). Last line: `async_over_sync_after_over_before: X`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = {
    "pipeline": ["benchmarks/pipeline.py", "--steps", "40"],
    "weight_sync": ["benchmarks/weight_sync.py", "--hidden", "256", "--layers", "2", "--repeats", "3"],
    "rollout": ["benchmarks/rollout.py", "--prompts", "32", "--max-actions", "64", "--repeats", "2"],
}
_FIGURE = re.compile(r"^([A-Za-z_][\w\[\],.=-]*): (-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)$")
_BUSY = re.compile(r"^\s*(\w+)\s*: ([\d.]+) steps/s, rollout busy (\d+)%, learner busy (\d+)%")


def figures(out: str) -> dict[str, float]:
    """Every `name: value` line of a benchmark's output, and pipeline.py's busy fractions."""
    got: dict[str, float] = {}
    for line in out.splitlines():
        if m := _FIGURE.match(line.strip()):
            got[m.group(1)] = float(m.group(2))
        elif m := _BUSY.match(line):
            mode = m.group(1)
            got[f"steps_per_s[{mode}]"] = float(m.group(2))
            got[f"rollout_busy[{mode}]"] = float(m.group(3)) / 100
            got[f"learner_busy[{mode}]"] = float(m.group(4)) / 100
    return got


def checkout(rev: str) -> Path:
    """A detached worktree of `rev` in a temporary folder (removed at exit by the caller)."""
    where = Path(tempfile.mkdtemp(prefix="smdist-before-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)  # fmt: skip
    return where


def run(tree: Path, bench: list[str], timeout_s: float) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.run([sys.executable, *bench], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=timeout_s)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"{bench[0]} failed in {tree} (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return figures(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git revision before the change")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each benchmark per side")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=sorted(BENCHES))
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per benchmark process")
    args = ap.parse_args()
    base = checkout(args.base)
    sides = {"before": base, "after": ROOT}
    got: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    try:
        for r in range(args.rounds):
            for name in args.only:
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for side in order:
                    print(f"round {r + 1}/{args.rounds}: {name} ({side})", flush=True)
                    for k, v in run(sides[side], BENCHES[name], args.timeout_s).items():
                        got[side].setdefault(k, []).append(v)
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True
        )
    print(f"{'figure':44s} {'before':>12s} {'after':>12s} {'after/before':>12s}")
    for k in sorted(set(got["before"]) & set(got["after"])):
        b, a = statistics.median(got["before"][k]), statistics.median(got["after"][k])
        ratio = f"{a / b:.3f}" if b else "-"
        print(f"{k:44s} {b:12.4g} {a:12.4g} {ratio:>12s}", flush=True)
    key = "async_over_sync"
    if key in got["before"] and key in got["after"]:
        ratio = statistics.median(got["after"][key]) / statistics.median(got["before"][key])
        print(f"async_over_sync_after_over_before: {ratio:.3f}")


if __name__ == "__main__":
    main()
