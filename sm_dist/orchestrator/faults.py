"""What a run does when something fails or it is told to stop: rollout workers that die and restart
(`WorkerRestarts`), the signal handlers (finish the step, then a final checkpoint), the checkpoint of
the learners' state and the rescue checkpoint after a failed loop (`Checkpointer`). Nothing here
schedules work: a worker's loop (rollouts.py) and the learner loop (driver.py) call in.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sm_dist.learner import checkpoint as ckpt
from sm_dist.orchestrator.actors import describe_error
from sm_dist.orchestrator.learners import LearnerDied
from sm_dist.orchestrator.tasks import RolloutPolicy, WorkerSet, gather

log = logging.getLogger("sm_dist.driver")


@dataclass
class RunState:
    """What a checkpoint records for the driver (run_state.json)."""

    step: int = 0
    version: int = 0
    syncs: dict[str, int] = field(default_factory=dict)  # weight versions applied, per worker
    expert_rows: int = 0
    rollout_batches: int = 0


# ---- rollout workers that die ------------------------------------------------------------------------


class WorkerRestarts:
    """A dead worker is restarted by Ray (rollout.max_restarts): count its restarts, tell a real death
    from a caller's lagging view of a restart, and wait for its new process."""

    def __init__(self, ray: Any, workers: WorkerSet, policy: RolloutPolicy, pause_s: float = 0.5):
        """`pause_s`: between two tries of a worker that is restarting."""
        self.ray, self.ws, self.p, self.pause_s = ray, workers, policy, pause_s
        self.counts: dict[str, int] = {}  # name -> restarts
        self.incarnations: dict[str, str] = {}  # name -> the process a restarted worker answered from
        self.unavailable: dict[str, int] = {}  # name -> failed calls in a row while that process lives

    def answered(self, name: str) -> None:
        """Worker `name` answered a call."""
        self.unavailable.pop(name, None)

    def forget(self, name: str) -> None:
        """A removed worker: a later one may take the name."""
        self.incarnations.pop(name, None)

    async def still_alive(self, name: str, err: Exception, why: str) -> bool:
        """A call that failed with ActorUnavailableError ("the actor is restarting") on a worker Ray
        already restarted, whose new process still answers: a caller's view of the restart lagged (e.g.
        the learner re-sending weights right after it), not a second death. The caller sends it again."""
        if not isinstance(err, self.ray.exceptions.ActorUnavailableError) or name not in self.incarnations:
            return False
        if await self.wait_restarted(name) != self.incarnations[name]:
            return False  # a new process: it did die again
        n = self.unavailable[name] = self.unavailable.get(name, 0) + 1
        if n > 10:
            raise RuntimeError(
                f"rollout worker {name}: {n} calls in a row failed as unavailable while its process lives; "
                "the Ray cluster is unhealthy (see `ray status` and the run dir's logs)"
            ) from err
        log.warning(f"rollout worker {name} was unavailable for one call ({why}); sent again")
        await asyncio.sleep(self.pause_s)  # let the caller's view of the actor catch up
        return True

    async def restarted(self, name: str, err: Exception, why: str, during: str) -> None:
        """Worker `name` died `during` something: raise past rollout.max_restarts (or when the transport
        cannot take it back), else wait until Ray restarted it."""
        n = self.counts[name] = self.counts.get(name, 0) + 1
        if n > self.p.max_restarts:
            raise RuntimeError(
                f"rollout worker {name} died {n} times (rollout.max_restarts={self.p.max_restarts}); last: {why}"
            ) from err
        if not self.p.restarts_rejoin:
            raise RuntimeError(
                f"rollout worker {name} died ({why}); a restarted worker cannot rejoin this sync.transport's "
                "group. Resume the run (--resume), or use sync.transport.kind=object_store, which survives "
                "worker restarts"
            ) from err
        log.warning(f"rollout worker {name} died during {during} ({why}); restart {n}/{self.p.max_restarts}")
        self.incarnations[name] = await self.wait_restarted(name)

    async def wait_restarted(self, name: str) -> str:
        """Wait until worker `name` answers (Ray restarts a dead one); returns its process (`incarnation`)."""
        from sm_dist.rollout.worker import incarnation

        ex = self.ray.exceptions
        deadline = time.monotonic() + self.p.startup_timeout_s
        while True:  # calls fail with ActorUnavailableError while Ray restarts the actor
            try:
                call = self.ws.handle(name).__ray_call__.remote(incarnation)
                return await asyncio.wait_for(call, max(1.0, deadline - time.monotonic()))
            except (ex.ActorUnavailableError, TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"rollout worker {name} did not restart within run.startup_timeout_s="
                        f"{self.p.startup_timeout_s}s"
                    ) from e
                await asyncio.sleep(self.pause_s)


# ---- stopping --------------------------------------------------------------------------------------


class Stoppable(Protocol):
    stopping: bool


def install_signal_handlers(run: Stoppable) -> None:
    """SIGINT/SIGTERM: finish the current step, then a final checkpoint; a second one stops now."""

    def handler(signum, _frame):
        if run.stopping:  # second signal: stop now
            raise KeyboardInterrupt
        run.stopping = True
        log.warning(f"got signal {signum}: finishing the current step, then a final checkpoint")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# ---- checkpoints -----------------------------------------------------------------------------------


class Saver(Protocol):
    """The learners, as a checkpoint needs them (`LearnerGroup`)."""

    def save_futures(self, ckpt_dir: str) -> list: ...


class Checkpointer:
    """Checkpoints of the learners' state with the run state, and the rescue after a failed loop."""

    def __init__(self, ray: Any, run_dir: str, keep_last: int, sync_timeout_s: float, group: Saver,
                 replay: Any):  # fmt: skip
        """`replay`: the `ReplayShards` (its stats are recorded)."""
        self.ray, self.run_dir, self.keep_last, self.sync_timeout_s = ray, run_dir, keep_last, sync_timeout_s
        self.group, self.replay = group, replay

    async def save(self, state: RunState, timeout_s: float | None = None) -> Path:
        """A checkpoint of `state`; the rollouts go on while the learners save."""
        tmp = ckpt.begin(self.run_dir, state.step)
        await gather(self.group.save_futures(str(tmp)), timeout_s)
        return self._commit(tmp, state)

    def save_now(self, state: RunState, timeout_s: float) -> Path:
        """A checkpoint of `state` with the event loop stopped (after a failure: no worker task runs)."""
        tmp = ckpt.begin(self.run_dir, state.step)
        self.ray.get(self.group.save_futures(str(tmp)), timeout=timeout_s)
        return self._commit(tmp, state)

    def _commit(self, tmp: Path, state: RunState) -> Path:
        try:  # informational: the buffer restores itself from its own manifest on resume
            stats = self.replay.stats(timeout=self.sync_timeout_s)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
            stats = {"rows": None, "added_rows": None}
        record = {
            **state.__dict__, "buffer_rows": stats["rows"], "buffer_added_rows": stats["added_rows"],
            "buffer_shards": len(self.replay),
        }  # fmt: skip
        return ckpt.commit(tmp, record, self.run_dir, self.keep_last)

    def _failure(self, err: BaseException) -> str:
        """`describe_error`, with a dead replay-buffer shard named (which shard, and its folder) when the
        buffer has several: "ReplayBuffer" alone would not say which of them died."""
        text = describe_error(err)
        dead = "[dead actor: ReplayBuffer]"
        shard = self.replay.dead_shard(err) if len(self.replay) > 1 and text.endswith(dead) else None
        return text[: -len(dead)] + f"[dead actor: {shard}]" if shard else text

    def rescue(self, state: RunState, err: BaseException) -> None:
        """The loop failed: checkpoint what the learners hold (if they still answer), so nothing since the
        last checkpoint is lost, and say how to resume."""
        log.error(f"the run failed at step {state.step}: {self._failure(err)}")
        last = ckpt.latest_checkpoint(self.run_dir)
        if last is not None and last.name == f"step-{state.step:08d}":
            log.info(f"checkpoint {last} already holds step {state.step}")
        elif isinstance(err, LearnerDied):  # the loop turns every learner death it cannot mend into this
            log.warning(f"a dead learner cannot save step {state.step}: the last checkpoint stands")
        else:
            try:
                last = self.save_now(state, timeout_s=self.sync_timeout_s)
                log.info(f"saved checkpoint {last}")
            except Exception as e2:  # a dead or hung learner cannot save: the last checkpoint stands
                log.error(f"could not checkpoint step {state.step} ({type(e2).__name__}: {e2})")
        if last is not None:
            log.info(f"resume from {last} with: sm-dist train --resume {self.run_dir}")
