"""The driver loop's side of the control API (sm_dist/service/api.py): calls queued from the server's thread,
applied by the loop's thread between two learner steps, and a snapshot of the run for the read-only
endpoints.

    ctl = Controller(run_dir)
    fut = ctl.submit("scale", 3)     # any thread: a concurrent.futures.Future of the call's answer
    ctl.apply(trainer)               # the loop's thread, between steps (blocks while paused)
    ctl.update(trainer, metrics)     # the loop's thread, after a step: the snapshot /status, /metrics read

Nothing the server thread calls touches the run's state: it only enqueues, or reads the last snapshot
(a dict replaced whole, never mutated). The calls: scale N, pause, resume, checkpoint, stop.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger("sm_dist.driver")

COMMANDS = ("scale", "pause", "resume", "checkpoint", "stop")


class Controller:
    def __init__(self, run_dir: str | Path, buffer_refresh_s: float = 2.0):
        self.run_dir = Path(run_dir)
        self.calls: queue.Queue = queue.Queue()
        self.paused = False
        self.snapshot: dict[str, Any] = {"step": 0, "paused": False, "started": time.time()}
        self.buffer_refresh_s = buffer_refresh_s
        self._buffers: tuple[float, dict] = (0.0, {})
        self._steps: list[tuple[float, int]] = []  # (time, step) of the recent steps: the step rate

    # ---- any thread
    def submit(self, command: str, arg: Any = None) -> Future:
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
        fut: Future = Future()
        self.calls.put((command, arg, fut))
        return fut

    def status(self) -> dict:
        """What `sm-dist status` shows (from the run directory's files), with the live snapshot."""
        from sm_dist.service.status import run_status

        st = run_status(self.run_dir)
        st["live"] = dict(self.snapshot)
        return st

    def metrics_text(self) -> str:
        from sm_dist.service.prom import render

        return render(self.snapshot)

    # ---- the loop's thread
    def apply(self, t: Any) -> None:
        """Run the queued calls; while paused, keep handling worker answers and calls until resumed
        or stopped. Workers added earlier join here (`WorkerPool.admit`), and new data.watch_dir files
        are taken."""
        while True:
            self._drain_calls(t)
            if t.pool is not None:
                t.pool.admit()
            if getattr(t, "autoscaler", None) is not None:
                self._autoscale(t)
            if getattr(t, "watcher", None) is not None:
                t.s.expert_rows += t.watcher.poll(step=t.s.step)  # data.watch_dir (sm_dist/data/watch.py)
            if not self.paused or t.stop_requested:
                return
            self._refresh(t)
            t.sched.poll(0.2)  # batches in flight land; none are resubmitted while paused

    def _autoscale(self, t: Any) -> None:
        replay = (self._buffers[1] or {}).get("replay") or {}
        fill = replay.get("rows", 0) / t.cfg.buffer.capacity_rows
        try:
            t.autoscaler.tick(t.sampler.wait_s, fill)
        except ValueError as e:  # e.g. a refused size: reported, the run goes on
            log.warning(f"autoscaling: {e}")

    def _drain_calls(self, t: Any) -> None:
        while True:
            try:
                command, arg, fut = self.calls.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._run(t, command, arg))
            except Exception as e:  # the caller gets the error; the run goes on
                log.warning(f"control call {command} {arg if arg is not None else ''} failed: {e}")
                fut.set_exception(e)

    def _run(self, t: Any, command: str, arg: Any) -> dict:
        log.info(f"control call: {command}{'' if arg is None else f' {arg}'}")
        if command == "scale":
            if t.pool is None:
                raise ValueError("this run cannot scale its rollout workers")
            return t.pool.scale_to(int(arg))
        if command == "pause":
            self.paused = t.sched.paused = True
        elif command == "resume":
            self.paused = t.sched.paused = False
            t.sched.resume_batches()
        elif command == "checkpoint":
            from sm_dist.orchestrator.faults import save_checkpoint

            return {"checkpoint": str(save_checkpoint(t)), "step": t.s.step}
        elif command == "stop":
            t.stop_requested = True
        self.snapshot = {**self.snapshot, "paused": self.paused, "stopping": t.stop_requested}
        return {"paused": self.paused, "stopping": t.stop_requested, "step": t.s.step}

    def update(self, t: Any, metrics: dict | None = None) -> None:
        """After a step: the snapshot the read-only endpoints serve."""
        now = time.time()
        self._steps = [*self._steps[-49:], (now, t.s.step)]
        (t0, s0), (t1, s1) = self._steps[0], self._steps[-1]
        rate = (s1 - s0) / (t1 - t0) if t1 > t0 else None
        self._refresh(t, metrics, rate)

    def _refresh(self, t: Any, metrics: dict | None = None, rate: float | None = None) -> None:
        when, bufs = self._buffers
        if time.monotonic() - when > self.buffer_refresh_s:  # an actor call: not every step
            try:
                bufs = {
                    "replay": t.replay.stats(timeout=10),
                    "expert": t.ray.get(t.expert.stats.remote(), timeout=10),
                }
                self._buffers = (time.monotonic(), bufs)
            except Exception as e:  # a dead buffer is the loop's to handle; the snapshot keeps the last
                log.debug(f"buffer stats for the control API: {e}")
        prev = self.snapshot
        self.snapshot = {
            **prev,
            "time": time.time(),
            "step": t.s.step,
            "total_steps": t.cfg.run.total_steps,
            "version": t.s.version,
            "paused": self.paused,
            "stopping": t.stop_requested,
            "steps_per_s": rate if rate is not None else prev.get("steps_per_s"),
            "workers": list(t.sched.names),
            "joining": t.sched.pending_joins(),
            "buffers": bufs,
            "metrics": metrics if metrics is not None else prev.get("metrics", {}),
            # the last publish's timings: a step that published is rarely the last one logged
            "sync": {
                **prev.get("sync", {}),
                **{k: v for k, v in (metrics or {}).items() if _sync_time(k, v)},
            },
        }


def _sync_time(key: str, value) -> bool:
    return key.startswith("sync/") and key.endswith("_s") and value is not None
