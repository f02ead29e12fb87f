"""The orchestrator's parts on their fault paths, with fakes instead of Ray (tests/unit/fakes.py): a
worker that dies (restarted, re-sent the weights, its batch resubmitted; or the run stops, naming why),
a late or wrong weight confirmation, a sync whose sender died, a dead learner rank (found, rebuilt from
the latest checkpoint, or refused), and the batch sampler's staleness wait."""

from __future__ import annotations

import asyncio

import pytest

from sm_dist.orchestrator.learners import LearnerDied, LearnerGroup
from sm_dist.orchestrator.tasks import RolloutPolicy, gather
from sm_dist.sync.base import Delivery, WeightSyncError
from tests.unit.fakes import (
    ActorUnavailableError,
    FakeActor,
    FakeRay,
    Fut,
    Method,
    OwnerDiedError,
    RayActorError,
    TaskErrorFromDeadActor,
    in_flight,
    rollouts_with,
    run,
    settle,
)

STATS = {"rollout/gen_s": 0.5, "rollout/tokens_per_s": 100.0}
HANG = Fut(ready=False)  # a batch that never lands: a worker's loop waits there
IDLE = {"batches": [], "syncs": []}


def worker(*batch_answers, processes=("host:1",)):
    """`processes`: what `incarnation` answers in turn (an error while Ray restarts it)."""
    return FakeActor(run_batch=Method(*batch_answers), version=Method(0), __ray_call__=Method(*processes))


def test_batches_land_while_the_learners_step_and_are_resubmitted():
    w = worker(STATS, HANG)
    s = rollouts_with([w])
    learners = Fut({"loss": 1.0}, ready=False)

    async def go():
        s.start()
        step = asyncio.ensure_future(gather([learners]))
        await settle()
        assert s.batches == 1 and len(w.run_batch.calls) == 2  # landed, the next batch went out
        assert in_flight(s) == {"batches": ["w0"], "syncs": []} and not step.done()
        learners.ready = True
        assert await step == [{"loss": 1.0}]

    run(go())
    assert s.take_stats()["rollout/tokens_per_s"] == 100.0


def test_a_dead_worker_is_restarted_resent_the_weights_and_resubmitted():
    died = Fut(error=RayActorError("the worker process died"))
    w = worker(died, STATS, processes=(Fut(error=ActorUnavailableError("restarting")), "host:2"))
    s = rollouts_with([w], resend=lambda i: Delivery(3, {i: Fut(3, ready=False)}))

    async def go():
        s.start()
        await settle()
        assert s.restarts.counts == {"w0": 1} and s.sync.group.resent == [0]
        assert in_flight(s) == {"batches": [], "syncs": ["w0"]}  # the weights; its batch once applied

    run(go())


def test_a_restarted_worker_generates_only_once_it_holds_the_current_weights():
    """The race behind a flaky end-to-end test: the re-sent weights come from the learner and the batch
    from the driver, and Ray orders calls per caller only, so a batch sent at the restart could run on
    the initial weights (rows with policy_version 0). The batch goes out on the weights' confirmation."""
    weights = Fut(3, ready=False)
    w = worker(Fut(error=RayActorError("killed")), HANG, processes=("host:2",))
    s = rollouts_with([w], resend=lambda i: Delivery(3, {i: weights}))

    async def go():
        s.start()
        await settle()  # the death: restarted, the weights re-sent
        assert len(w.run_batch.calls) == 1  # no batch before the weights
        assert in_flight(s) == {"batches": [], "syncs": ["w0"]}
        weights.ready = True
        await settle()  # the confirmation lands: now its batch
        assert s.sync.state.syncs == {"w0": 1} and len(w.run_batch.calls) == 2
        assert in_flight(s) == {"batches": ["w0"], "syncs": []}

    run(go())


def fails(s, rounds=500):
    """Run `Rollouts` `s`'s loops until they wait; the fatal error they met (raised by `check`)."""

    async def go():
        s.start()
        await settle(rounds)

    run(go())
    s.tasks.check()


def test_a_worker_that_dies_too_often_stops_the_run_naming_it():
    s = rollouts_with([worker(Fut(error=RayActorError("OOM killed")))], resend=lambda i: Delivery(1))
    with pytest.raises(RuntimeError, match=r"w0 died 2 times \(rollout.max_restarts=1\).*OOM killed"):
        fails(s)  # first death: restarted; the second stops it
    assert s.restarts.counts == {"w0": 2}


def test_a_call_unavailable_after_a_restart_is_sent_again_not_counted_as_a_death():
    """After a restart, a caller whose view of the actor lags (the learner re-sending the weights) gets
    "the actor is restarting" while the new process answers: sent again, not a second death."""
    unavailable = Fut(error=ActorUnavailableError("The actor is restarting"))
    again = Fut(3, ready=False)
    w = worker(Fut(error=RayActorError("killed")), STATS, HANG, processes=("host:2",))
    sent = []

    def resend(i):
        sent.append(i)
        return Delivery(3, {i: unavailable if len(sent) == 1 else again})

    s = rollouts_with([w], resend=resend)

    async def go():
        s.start()
        await settle()  # the death: restarted; the re-send failed as "restarting", but host:2 answers
        assert s.restarts.counts == {"w0": 1} and sent == [0, 0] and s.restarts.unavailable == {"w0": 1}
        assert len(w.run_batch.calls) == 1
        again.ready = True
        await settle()  # applied; its first batch after the weights: the worker answers again

    run(go())
    assert s.sync.state.syncs == {"w0": 1} and s.batches == 1 and s.restarts.unavailable == {}
    assert s.restarts.counts == {"w0": 1}


def test_an_unavailable_call_from_a_new_process_is_a_death_and_endless_ones_stop_the_run():
    gone = Fut(error=ActorUnavailableError("The actor is restarting"))
    s = rollouts_with([worker(Fut(error=RayActorError("killed")), gone, processes=("host:2", "host:3"))])
    with pytest.raises(RuntimeError, match=r"w0 died 2 times"):  # host:3 answers: it died again
        fails(s)

    s = rollouts_with([worker(Fut(error=RayActorError("killed")), gone, processes=("host:2",))])
    with pytest.raises(RuntimeError, match=r"w0: 11 calls in a row failed as unavailable.*ray status"):
        fails(s, rounds=5000)  # the same process answers each time: sent again, ten times
    assert s.restarts.counts == {"w0": 1}


def test_a_dead_worker_on_a_collective_transport_stops_the_run_with_the_fix():
    s = rollouts_with(
        [worker(Fut(error=RayActorError("gone")))], RolloutPolicy(3, 30.0, 5.0, restarts_rejoin=False)
    )
    with pytest.raises(RuntimeError, match=r"cannot rejoin.*--resume.*object_store"):
        fails(s)


def test_an_error_inside_a_live_worker_is_not_taken_for_a_death():
    s = rollouts_with([worker(Fut(error=TaskErrorFromDeadActor("the replay buffer died")))])
    with pytest.raises(TaskErrorFromDeadActor):
        fails(s)
    assert s.restarts.counts == {}


def test_a_publish_every_sync_every_steps_and_its_deadline_names_the_late_worker_and_version():
    s = rollouts_with(
        [worker(STATS), worker(STATS)], publish=lambda v: Delivery(v, {0: Fut(v), 1: Fut(v, ready=False)})
    )
    s.sync.every = 2

    async def go():
        assert await s.sync.maybe_publish(3) == {} and s.sync.state.version == 0  # not a multiple
        assert "sync/publish_s" in await s.sync.maybe_publish(4) and s.sync.state.version == 1
        await settle()  # w0's confirmation
        (late,) = s.sync.pending()
        s.sync.check_deadline(now=late.at + 29.0)  # within sync.timeout_s
        with pytest.raises(
            WeightSyncError, match=r"w1 did not apply weights version 1 within sync.timeout_s=30.0s"
        ):
            s.sync.check_deadline(now=late.at + 31.0)

    run(go())
    assert s.sync.state.syncs == {"w0": 1}


def test_a_wrong_version_confirmation_is_an_error():
    s = rollouts_with([worker(STATS)], publish=lambda v: Delivery(v, {0: Fut(v - 1)}))
    s.sync.state.version = 4

    async def go():
        await s.sync.publish()
        await settle()

    run(go())
    with pytest.raises(WeightSyncError, match="w0 reports version 4 after a sync of version 5"):
        s.tasks.check()


def test_a_collective_delivery_counts_every_worker_and_a_lost_sender_is_dropped():
    answers = [Delivery(1), Delivery(2, {0: Fut(error=OwnerDiedError("the learner that sent it died"))})]
    s = rollouts_with([worker(STATS), worker(STATS)], publish=lambda v: answers[v - 1])

    async def go():
        await s.sync.publish()  # the send waited for every worker
        assert s.sync.state.syncs == {"w0": 1, "w1": 1}
        await s.sync.publish()
        await settle()
        assert in_flight(s) == IDLE

    run(go())
    s.tasks.check()
    assert s.sync.state.syncs == {"w0": 1, "w1": 1}


def test_a_learner_restart_drops_the_confirmations_in_flight():
    s = rollouts_with([worker(HANG)], publish=lambda v: Delivery(v, {0: Fut(v, ready=False)}))

    async def go():
        s.start()
        await s.sync.publish()
        s.sync.drop()
        await settle()
        assert in_flight(s) == {"batches": ["w0"], "syncs": []}
        s.sync.check_deadline(now=1e12)  # nothing late: the dropped version is not waited for

    run(go())


def test_the_wait_for_a_batch_without_loops_or_answers_says_why():
    s = rollouts_with([worker(HANG)])

    async def go():
        with pytest.raises(RuntimeError, match="no rollout call is in flight"):
            await s.next_batch(1.0, "the learner waited for fresh rows")
        s.start()
        with pytest.raises(TimeoutError, match="within 0.05s while the learner waited for fresh rows"):
            await s.next_batch(0.05, "the learner waited for fresh rows")

    run(go())


def test_a_paused_run_resubmits_nothing_until_resumed_and_drain_lands_everything():
    first, second = Fut(STATS, ready=False), Fut(STATS, ready=False)
    w = worker(first, second)
    s = rollouts_with([w])

    async def go():
        s.start()
        await settle()
        s.pause(True)
        first.ready = True
        await settle()
        assert in_flight(s) == IDLE and len(w.run_batch.calls) == 1 and s.batches == 1
        s.pause(False)
        await settle()
        assert in_flight(s) == {"batches": ["w0"], "syncs": []}
        drain = asyncio.ensure_future(s.drain())
        await settle()
        second.ready = True
        await drain

    run(go())
    assert s.stopping and in_flight(s) == IDLE and s.batches == 2 and len(w.run_batch.calls) == 2


# ---- the learner group ---------------------------------------------------------------------------


def cfg(tmp_path, max_restarts=1, survives=True):
    from types import SimpleNamespace

    transport = SimpleNamespace(survives_restarts=survives, kind="object_store" if survives else "gloo")
    return SimpleNamespace(
        learner=SimpleNamespace(max_restarts=max_restarts),
        sync=SimpleNamespace(transport=transport, timeout_s=30.0),
        run=SimpleNamespace(run_dir=str(tmp_path), startup_timeout_s=5.0),
        model=SimpleNamespace(dir="/models/initial"),
    )


def learner(actor_id, step=0):
    return FakeActor(
        actor_id,
        __ray_call__=Method(step),  # sm_dist.learner.calls.step, the probe
        publish_weights=Method(None),
        load=Method(lambda d: step),
        train_step=Method({"loss/total": 1.0, "perf/learner_step_s": 0.1}),
    )


def group(tmp_path, learners, **kw):
    ray, built = FakeRay(), []

    def build(model_dir):
        built.append(model_dir)
        return [learner(f"new{r}") for r in range(len(learners))]

    return LearnerGroup(ray, cfg(tmp_path, **kw), learners, build), built


def test_the_dead_rank_is_found_from_the_error_or_by_probing(tmp_path):
    g, _ = group(tmp_path, [learner("a"), learner("b")])
    assert g.dead_rank(RayActorError("died", actor_id="b")) == 1
    assert g.dead_rank(RayActorError("died", actor_id="someone else")) is None
    assert g.dead_rank(ValueError("a bug")) is None
    g.learners[0].__ray_call__ = Method(Fut(error=RayActorError("gone", actor_id="a")))
    assert g.dead_rank(TaskErrorFromDeadActor("collective lost its peer")) == 0


def test_a_dead_rank_rebuilds_every_rank_from_the_initial_model_without_a_checkpoint(tmp_path):
    old = [learner("a"), learner("b")]
    g, built = group(tmp_path, old)
    assert run(g.restart(1, RayActorError("died", actor_id="b"), ["w"], ["w0"], at_step=7)) == 0
    assert built == ["/models/initial"] and g.ray.killed == old
    assert [lr._actor_id.hex() for lr in g.learners] == ["new0", "new1"]
    assert all(lr.publish_weights.calls == [({"workers": ["w"], "names": ["w0"]},)] for lr in g.learners)
    with pytest.raises(LearnerDied, match=r"learner.max_restarts=1 restarts used up"):
        run(g.restart(0, RayActorError("died again"), ["w"], ["w0"], at_step=1))


def test_a_dead_rank_on_a_collective_transport_is_refused_with_the_fix(tmp_path):
    g, built = group(tmp_path, [learner("a")], survives=False)
    with pytest.raises(LearnerDied, match=r"cannot rejoin the sync.transport=gloo group.*--resume"):
        run(g.restart(0, RayActorError("died"), [], [], at_step=3))
    assert built == []


def test_a_step_averages_the_ranks_and_counts_the_slowest(tmp_path):
    g, _ = group(tmp_path, [learner("a"), learner("b")])
    g.learners[1].train_step = Method({"loss/total": 3.0, "perf/learner_step_s": 0.4})
    m = run(g.step([1, 2], [3, 4]))
    assert m["loss/total"] == 2.0 and g.busy_s == 0.4
    assert g.learners[0].train_step.calls == [(1, 3)] and g.learners[1].train_step.calls == [(2, 4)]


# ---- the batch sampler ---------------------------------------------------------------------------


def _sampler(replay_answers, fill=True, warmup=0):
    from types import SimpleNamespace

    import pyarrow as pa

    from sm_dist.buffer.shards import ReplayShards, shard_dirs
    from sm_dist.orchestrator.sampler import BatchSampler

    def rows(n, tag):
        return pa.table({"sample_id": [f"{tag}{i}" for i in range(n)]})

    replay = FakeActor(sample=Method(*(rows(n, "r") for n in replay_answers)))
    expert = FakeActor(sample=Method(lambda n: rows(n, "d")))
    c = SimpleNamespace(
        buffer=SimpleNamespace(
            wait_for_replay=True, max_staleness=2, newest_first=False, fill_with_data=fill
        ),
        objective=SimpleNamespace(warmup_steps=warmup),
        sync=SimpleNamespace(timeout_s=30.0),
        split_batch=lambda: (6, 6),
    )
    shards = ReplayShards(FakeRay(), [replay], shard_dirs("run", 1))  # one shard: one sample call a try
    waits: list = []

    async def next_batch(timeout_s, why):
        waits.append(why)

    rollouts = SimpleNamespace(next_batch=next_batch, stopping=False)
    return (
        BatchSampler(FakeRay(), c, shards, expert, rollouts),
        replay,
        expert,
        waits,
    )


def test_the_sampler_waits_for_fresh_rollouts_then_splits_each_source_evenly():
    sampler, replay, expert, waits = _sampler([0, 3, 6])  # empty, too few, then enough fresh rows
    data, rep = run(sampler.sample(2, step=3, version=10))
    assert len(waits) == 2 and "buffer.wait_for_replay" in waits[0]
    assert len(replay.sample.calls) == 3 and [r.num_rows for r in rep] == [3, 3]
    assert expert.sample.calls == [(6,)] and [d.num_rows for d in data] == [3, 3]
    assert data[0]["sample_id"].to_pylist() == ["d0", "d2", "d4"]


def test_the_sampler_fills_a_short_replay_half_with_data_during_warmup():
    sampler, _, expert, waits = _sampler([5], warmup=10)  # step 3 < warmup: no waiting
    data, rep = run(sampler.sample(2, step=3, version=10))
    assert waits == []
    assert [r.num_rows for r in rep] == [2, 2]  # 5 fresh rows -> 4, an even split
    assert expert.sample.calls == [(8,)] and [d.num_rows for d in data] == [4, 4]  # 6 + the 2 missing
    sampler, _, expert, _ = _sampler([5], fill=False, warmup=10)
    run(sampler.sample(2, step=3, version=10))
    assert expert.sample.calls == [(6,)]


def test_a_restarted_worker_in_synchronous_mode_gets_its_weights_before_the_next_round():
    w = worker(Fut(error=RayActorError("killed")), STATS, processes=("host:2",))
    sync_policy = RolloutPolicy(1, 30.0, 5.0, asynchronous=False)
    s = rollouts_with([w], sync_policy, resend=lambda i: Delivery(2, {i: Fut(2)}))
    run(s.run_round())  # the death: restarted, the weights applied here, no batch until the next round
    assert s.sync.state.syncs == {"w0": 1} and in_flight(s) == IDLE and s.ws.awaiting == set()
    assert s.batches == 0
    run(s.run_round())
    assert s.batches == 1 and len(w.run_batch.calls) == 2
