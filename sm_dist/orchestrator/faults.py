"""What a run does when it is stopped or fails: the signal handlers (finish the step, then a final
checkpoint), the checkpoint of the learners' state, and the rescue checkpoint after a failed loop.
`t` is the driver's `Trainer`; nothing here schedules work.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from sm_dist.learner import checkpoint as ckpt
from sm_dist.orchestrator.actors import describe_error
from sm_dist.orchestrator.learners import LearnerDied

log = logging.getLogger("sm_dist.driver")


@dataclass
class RunState:
    """What a checkpoint records for the driver (run_state.json)."""

    step: int = 0
    version: int = 0
    syncs: dict[str, int] = field(default_factory=dict)  # weight versions applied, per worker
    expert_rows: int = 0
    rollout_batches: int = 0


# ---- the loop ---------------------------------------------------------------------------------------


def install_signal_handlers(trainer) -> None:
    def handler(signum, _frame):
        if trainer.stop_requested:  # second signal: stop now
            raise KeyboardInterrupt
        trainer.stop_requested = True
        log.warning(f"got signal {signum}: finishing the current step, then a final checkpoint")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def save_checkpoint(t, timeout_s: float | None = None) -> Path:
    tmp = ckpt.begin(t.cfg.run.run_dir, t.s.step)
    futs = t.group.save_futures(str(tmp))
    if timeout_s is None:
        t.wait_for(futs)
    else:  # after a failure: touch no worker future, bound the wait
        t.ray.get(futs, timeout=timeout_s)
    try:  # informational: the buffer restores itself from its own manifest on resume
        stats = t.replay.stats(timeout=t.cfg.sync.timeout_s)
    except (t.ray.exceptions.RayActorError, t.ray.exceptions.GetTimeoutError):
        stats = {"rows": None, "added_rows": None}
    state = {
        **t.state().__dict__, "buffer_rows": stats["rows"], "buffer_added_rows": stats["added_rows"],
        "buffer_shards": len(t.replay),
    }  # fmt: skip
    return ckpt.commit(tmp, state, t.cfg.run.run_dir, t.cfg.run.keep_last)


def _failure(t, err: BaseException) -> str:
    """`describe_error`, with a dead replay-buffer shard named (which shard, and its folder) when the
    buffer has several: "ReplayBuffer" alone would not say which of them died."""
    text = describe_error(err)
    dead = "[dead actor: ReplayBuffer]"
    shard = t.replay.dead_shard(err) if len(t.replay) > 1 and text.endswith(dead) else None
    return text[: -len(dead)] + f"[dead actor: {shard}]" if shard else text


def rescue_checkpoint(t, err: BaseException) -> None:
    """The loop failed: checkpoint what the learners hold (if they still answer), so nothing since the
    last checkpoint is lost, and say how to resume."""
    run_dir = t.cfg.run.run_dir
    log.error(f"the run failed at step {t.s.step}: {_failure(t, err)}")
    last = ckpt.latest_checkpoint(run_dir)
    if last is not None and last.name == f"step-{t.s.step:08d}":
        log.info(f"checkpoint {last} already holds step {t.s.step}")
    elif isinstance(err, LearnerDied):  # run_loop turns every learner death it cannot mend into this
        log.warning(f"a dead learner cannot save step {t.s.step}: the last checkpoint stands")
    else:
        try:
            last = save_checkpoint(t, timeout_s=t.cfg.sync.timeout_s)
            log.info(f"saved checkpoint {last}")
        except Exception as e2:  # a dead or hung learner cannot save: the last checkpoint stands
            log.error(f"could not checkpoint step {t.s.step} ({type(e2).__name__}: {e2})")
    if last is not None:
        log.info(f"resume from {last} with: sm-dist train --resume {run_dir}")
