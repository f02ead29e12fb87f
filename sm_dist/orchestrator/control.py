"""The driver loop's side of the control API (sm_dist/service/api.py): calls queued from the server's thread,
applied by the loop's thread between two learner steps, and a snapshot of the run for the read-only
endpoints.

    ctl = Controller(run_dir, run)   # run: what the calls act on (`Controllable`: the driver's Orchestrator)
    fut = ctl.submit("scale", 3)     # any thread: a concurrent.futures.Future of the call's answer
    await ctl.apply()                # the loop's thread, between steps (waits while paused)
    ctl.update(metrics)              # the loop's thread, after a step: the snapshot /status, /metrics read

Nothing the server thread calls touches the run's state: it only enqueues, or reads the last snapshot
(a dict replaced whole, never mutated). The calls: scale N, pause, resume, checkpoint, stop.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("sm_dist.driver")

COMMANDS = ("scale", "pause", "resume", "checkpoint", "stop")


@dataclass(frozen=True)
class RunView:
    """The run as the snapshot shows it."""

    step: int
    version: int
    total_steps: int | None
    workers: list[str]
    joining: int


class Controllable(Protocol):
    """What the control calls act on (the driver's `Orchestrator`)."""

    @property
    def stopping(self) -> bool: ...

    @property
    def paused(self) -> bool: ...

    async def scale(self, n: int) -> dict: ...

    def pause(self, paused: bool) -> None: ...

    def stop(self) -> None: ...

    async def checkpoint(self) -> dict: ...

    async def between_steps(self, buffers: dict) -> None:
        """Workers that started join, the autoscaler, new data.watch_dir files (`buffers`: the last
        buffer stats)."""

    async def poll(self, timeout_s: float) -> None:
        """While paused: let the rollouts' tasks run for `timeout_s` (a fatal error they met raises)."""

    def view(self) -> RunView: ...

    def buffer_stats(self) -> dict: ...


class Controller:
    def __init__(self, run_dir: str | Path, run: Controllable, buffer_refresh_s: float = 2.0):
        self.run_dir, self.run = Path(run_dir), run
        self.calls: queue.Queue = queue.Queue()
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
    async def apply(self) -> None:
        """Run the queued calls, then the run's between-steps work (`Controllable.between_steps`); while
        paused, keep the rollouts' tasks running and taking calls until resumed or stopped."""
        while True:
            await self._drain_calls()
            await self.run.between_steps(self._buffers[1])
            if not self.paused or self.run.stopping:
                return
            self._refresh()
            await self.run.poll(0.2)  # batches in flight land; none go out while paused

    async def _drain_calls(self) -> None:
        while True:
            try:
                command, arg, fut = self.calls.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(await self._run(command, arg))
            except Exception as e:  # the caller gets the error; the run goes on
                log.warning(f"control call {command} {arg if arg is not None else ''} failed: {e}")
                fut.set_exception(e)

    async def _run(self, command: str, arg: Any) -> dict:
        log.info(f"control call: {command}{'' if arg is None else f' {arg}'}")
        if command == "scale":
            return await self.run.scale(int(arg))
        if command == "checkpoint":
            return await self.run.checkpoint()
        if command in ("pause", "resume"):
            self.run.pause(command == "pause")
        elif command == "stop":
            self.run.stop()
        stopping = self.run.stopping
        self.snapshot = {**self.snapshot, "paused": self.paused, "stopping": stopping}
        return {"paused": self.paused, "stopping": stopping, "step": self.run.view().step}

    @property
    def paused(self) -> bool:
        """The run's own pause flag (one copy: the rollouts')."""
        return self.run.paused

    def update(self, metrics: dict | None = None) -> None:
        """After a step: the snapshot the read-only endpoints serve."""
        now, v = time.time(), self.run.view()
        self._steps = [*self._steps[-49:], (now, v.step)]
        (t0, s0), (t1, s1) = self._steps[0], self._steps[-1]
        rate = (s1 - s0) / (t1 - t0) if t1 > t0 else None
        self._refresh(metrics, rate, v)

    def _refresh(
        self, metrics: dict | None = None, rate: float | None = None, v: RunView | None = None
    ) -> None:
        when, bufs = self._buffers
        if time.monotonic() - when > self.buffer_refresh_s:  # an actor call: not every step
            try:
                bufs = self.run.buffer_stats()
                self._buffers = (time.monotonic(), bufs)
            except Exception as e:  # a dead buffer is the loop's to handle; the snapshot keeps the last
                log.debug(f"buffer stats for the control API: {e}")
        prev, v = self.snapshot, v or self.run.view()
        self.snapshot = {
            **prev,
            "time": time.time(),
            "step": v.step,
            "total_steps": v.total_steps,
            "version": v.version,
            "paused": self.paused,
            "stopping": self.run.stopping,
            "steps_per_s": rate if rate is not None else prev.get("steps_per_s"),
            "workers": list(v.workers),
            "joining": v.joining,
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
