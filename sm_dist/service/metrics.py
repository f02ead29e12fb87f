"""Metrics sink: one JSON object per line in `<run_dir>/metrics.jsonl`, mirrored to TensorBoard and,
optionally, to Weights & Biases (one W&B run per run dir: a resumed run continues the same W&B run).

Keys are namespaced (`loss/…`, `learner/…`, `rollout/…`, `sync/…`, `buffer/…`, `perf/…`); each line
also carries `step` and `time` (seconds since the run started).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path


class MetricsLogger:
    """Append-only metrics writer (jsonl + TensorBoard event files under `<run_dir>/tb`)."""

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        wandb: dict | None = None,
        config: dict | None = None,
        resume_step: int | None = None,
    ):
        """`wandb`: {"project", "entity", "mode"} to also log to W&B (None: off); `config` is the run's
        resolved config, recorded with the W&B run. `resume_step`: a run resumed from that step's
        checkpoint; TensorBoard drops the events past it (`purge_step`), which the steps redone now replace
        (the jsonl rows past it are set aside by `sm_dist.orchestrator.storage.set_aside_history`)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")
        self._t0 = time.time()
        self.tb_dir = Path(run_dir) / "tb"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(self.tb_dir), purge_step=purge)
            except ImportError:  # tensorboard is optional (extra "plot"); jsonl is always written
                self._tb = None
        self._wb = _start_wandb(Path(run_dir), wandb, config) if wandb and wandb.get("project") else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        line = {"step": step, "time": round(time.time() - self._t0, 3), **clean}
        self._f.write(json.dumps(line) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wb is not None:
            self._wb.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def text(self, tag: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, f"```\n{text}\n```", 0)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wb is not None:
            self._wb.finish()


def _start_wandb(run_dir: Path, opts: dict, config: dict | None):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(
            f"run.wandb_project={opts['project']!r} needs the wandb package: pip install 'sm-dist[wandb]' "
            "(or set run.wandb_project=null)"
        ) from e
    id_file = run_dir / "wandb_run_id"  # a resumed run continues the same W&B run
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=opts["project"],
        entity=opts.get("entity"),
        mode=opts.get("mode", "online"),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        name=run_dir.name,
        config=config,
    )


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The metric lines of a run; a truncated last line (a run killed mid-write) is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory written by `sm-dist train`")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines):
                raise ValueError(f"{path}:{i}: not a JSON object") from None
    if not rows:
        raise ValueError(f"{path} holds no metrics yet")
    return rows
