"""Metrics sink: one JSON object per line in `<run_dir>/metrics.jsonl`, mirrored to TensorBoard.

Keys are namespaced (`loss/…`, `learner/…`, `rollout/…`, `sync/…`, `buffer/…`, `perf/…`); each line
also carries `step` and `time` (seconds since the run started).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    """Append-only metrics writer (jsonl + TensorBoard event files under `<run_dir>/tb`)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")
        self._t0 = time.time()
        self.tb_dir = Path(run_dir) / "tb"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.tb_dir))
            except ImportError:  # tensorboard is optional (extra "plot"); jsonl is always written
                self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        line = {"step": step, "time": round(time.time() - self._t0, 3), **clean}
        self._f.write(json.dumps(line) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)

    def text(self, tag: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, f"```\n{text}\n```", 0)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
