"""The learner loop (`sm_dist.orchestrator.driver.learn`) over a real `Orchestrator` whose actors are
fakes (tests/unit/fakes.py): rollouts land and go out again while the learners step, every step
publishes (sync.every=1) and its confirmations land, a dead learner rank is rebuilt and its weights
re-published under a new version, a stop from the control API ends the loop after the step, a fatal
rollout answer stops it after the step in flight, and the in-flight batches are drained at the end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sm_dist.orchestrator.driver import learn
from sm_dist.orchestrator.faults import RunState
from sm_dist.orchestrator.run import Orchestrator, RunActors
from sm_dist.sync.base import Delivery
from tests.unit.fakes import FakeActor, FakeRay, Fut, Method, RayActorError, TaskErrorFromDeadActor, in_flight

STEP = {"loss/total": 1.0, "perf/learner_step_s": 0.1}


def config(tmp_path, total_steps=3):
    transport = SimpleNamespace(survives_restarts=True, collective=False, kind="object_store")
    return SimpleNamespace(
        rollout=SimpleNamespace(max_restarts=1, max_workers=None),
        learner=SimpleNamespace(max_restarts=1),
        sync=SimpleNamespace(timeout_s=30.0, every=1, transport=transport),
        run=SimpleNamespace(
            run_dir=str(tmp_path),
            startup_timeout_s=5.0,
            asynchronous=True,
            keep_last=2,
            total_steps=total_steps,
            progress=False,
            checkpoint_every=1000,
            log_every=1,
        ),  # fmt: skip
        buffer=SimpleNamespace(capacity_rows=100),
        model=SimpleNamespace(dir="/models/initial"),
    )


def learner(actor_id, step_answers=(STEP,)):
    return FakeActor(
        actor_id,
        train_step=Method(*step_answers),
        # publish_weights(version); with keywords only (connect, resend): nothing pending
        publish_weights=Method(lambda v=0: Delivery(v, {0: Fut(v)} if v else {})),
        __ray_call__=Method(0),  # sm_dist.learner.calls.step, the probe
    )


class Logger:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append((step, metrics))


def orchestrator(tmp_path, learners, total_steps=3, monkeypatch=None):
    ray = FakeRay()
    w = FakeActor(run_batch=Method({"rollout/gen_s": 0.5}), version=Method(0), set_prompts=Method(1))
    replay = SimpleNamespace(stats=lambda timeout=None: {"rows": 10}, __len__=lambda: 1)
    expert = FakeActor(stats=Method({"rows": 5}))
    a = RunActors(
        [[1], [2]], None, replay=replay, expert=expert, workers=[w], names=["w0"], learners=learners
    )
    built = []
    monkeypatch.setattr(
        "sm_dist.orchestrator.run.build_learners",
        lambda ray, cfg, d, pg: built.append(d) or [learner("new")],
    )
    o = Orchestrator(ray, config(tmp_path, total_steps), a, RunState(), Logger())

    async def sample(ranks, step, version):
        return [None] * ranks, [None] * ranks

    o.sampler = SimpleNamespace(sample=sample, wait_s=0.0, staleness=0.0)
    return o, w, built


def run_loop(o):
    """`learn` on the run's event loop, as the driver runs it; the loop closed afterwards."""
    try:
        o.run(learn(o))
    finally:
        o.close()


def test_the_loop_steps_publishes_and_drains(tmp_path, monkeypatch):
    o, w, _ = orchestrator(tmp_path, [learner("a")], monkeypatch=monkeypatch)
    run_loop(o)
    assert o.s.step == 3 and o.s.version == 3 and o.s.syncs == {"w0": 3}
    assert o.sched.batches == len(w.run_batch.calls) >= 3  # resubmitted while the learners stepped
    assert in_flight(o.sched) == {"batches": [], "syncs": []} and o.sched.stopping  # drained
    assert not o.sched.loops
    assert [s for s, _ in o.log.rows] == [1, 2, 3] and o.log.rows[-1][1]["rollout/workers"] == 1.0


def test_a_dead_learner_rank_is_rebuilt_and_its_weights_republished(tmp_path, monkeypatch):
    dead = learner("a", [STEP, Fut(error=RayActorError("rank 0 died", actor_id="a")), STEP])
    o, _, built = orchestrator(tmp_path, [dead], monkeypatch=monkeypatch)
    run_loop(o)
    assert built == ["/models/initial"] and o.group.restarts == 1  # no checkpoint yet: the initial model
    assert o.s.step == 3  # step 1 done, the restart went back to step 0, then 3 steps
    assert o.s.version == 5 and o.ray.killed == [dead]  # 1 publish, 1 after the restart, 3 more


def test_a_stop_from_the_control_api_ends_the_loop_after_the_step(tmp_path, monkeypatch):
    o, w, _ = orchestrator(tmp_path, [learner("a")], total_steps=None, monkeypatch=monkeypatch)
    steps = []

    def log(step, metrics):
        steps.append(step)
        if step == 2:
            o.control.submit("stop")

    o.log.log = log
    run_loop(o)
    assert steps == [1, 2] and o.s.step == 2 and o.stopping
    assert in_flight(o.sched)["batches"] == [] and not o.sched.loops
    assert o.sched.batches == len(w.run_batch.calls)  # every batch that went out landed and was counted


def test_a_fatal_rollout_answer_during_a_step_stops_the_run_after_that_step(tmp_path, monkeypatch):
    """The replay buffer died under a worker while the learners stepped: their step is counted and
    logged first, so a rescue checkpoint holds the step the metrics last show."""
    o, w, _ = orchestrator(tmp_path, [learner("a")], monkeypatch=monkeypatch)
    w.run_batch = Method(Fut(error=TaskErrorFromDeadActor("the replay buffer died")))
    with pytest.raises(TaskErrorFromDeadActor, match="replay buffer died"):
        run_loop(o)
    assert o.s.step == 1 and [s for s, _ in o.log.rows] == [1] and o.s.version == 1
