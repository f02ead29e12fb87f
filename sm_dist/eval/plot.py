"""`sm-dist plot RUN_DIR`: training curves from `<run_dir>/metrics.jsonl` to PNG files.

One figure per panel (losses, implicit rewards and values, rollouts, sync, throughput); a panel
whose keys a run never logged is skipped. Keys are the stable namespaced metric names of the driver.
"""

from __future__ import annotations

import math
from pathlib import Path

from sm_dist.service.metrics import read_metrics

PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss/total", "loss/bc", "loss/sm", "loss/data_term", "loss/chi2_term", "loss/value_term"),
    "rewards_values": ("r/mean_data", "r/mean_model", "v/mean", "v/s0_mean"),
    "rollout": ("rollout/backspace_rate", "rollout/eos_rate", "rollout/action_cap_rate"),
    "sync": ("sync/version", "sync/applied_min", "rollout/version"),
    "perf": ("perf/learner_busy", "perf/rollout_busy", "perf/step_s"),
}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel with data; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, keys in PANELS.items():
        drawn = [(k, *series(rows, k)) for k in keys]
        drawn = [d for d in drawn if d[1]]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, xs, ys in drawn:
            ax.plot(xs, ys, label=key, linewidth=1.2)
        ax.set_xlabel("learner step")
        ax.set_title(f"{Path(run_dir).name}: {panel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{panel}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
