"""Live scaling of the rollout workers with fakes instead of Ray (tests/unit/fakes.py): an added worker
joins once its constructor answered, gets the latest weights and only then its first batch; a removed
worker's batch lands (counted once) before it is killed; the indices of the others shift and their
calls follow them; the pool refuses a collective transport and cancels workers still starting first."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sm_dist.orchestrator import autoscale, scaling
from sm_dist.sync.base import Delivery
from tests.unit.fakes import FakeActor, Fut, Method, RayActorError, in_flight, rollouts_with, run, settle

STATS = {"rollout/gen_s": 0.5}
HANG = Fut(ready=False)


def worker(*batch_answers, ready=True):
    return FakeActor(
        run_batch=Method(*batch_answers), version=Method(Fut(0, ready=ready)), set_prompts=Method(1)
    )


def pool_for(s, transport_collective=False, prompts=10, monkeypatch=None):
    cfg = SimpleNamespace(
        sync=SimpleNamespace(transport=SimpleNamespace(collective=transport_collective, kind="gloo")),
        run=SimpleNamespace(seed=0),
        rollout=SimpleNamespace(cpus_per_worker=0.5, gpus_per_worker=0.0),
    )
    if monkeypatch is not None:
        monkeypatch.setattr(scaling, "worker_class", lambda ray, cfg: "W")
        monkeypatch.setattr(scaling, "shard", lambda ray, cfg, p, t, i, n: (i, n))
        monkeypatch.setattr(scaling, "make_worker", lambda W, cfg, name, *a: worker(STATS, ready=False))
    return scaling.WorkerPool(s.ray, cfg, s, s.tasks, list(range(prompts)), None, "model", None, None)


def add(pool, handles, names):
    """Workers being added, as `WorkerPool._start` starts them (their constructors in flight)."""
    for h, n in zip(handles, names, strict=True):
        pool.starting[n] = (pool.tasks.spawn(pool._join(h, n)), h)


def test_an_added_worker_gets_the_latest_weights_before_its_first_batch(monkeypatch):
    s = rollouts_with([worker(HANG)], resend=lambda i: Delivery(7, {i: weights}))
    weights = Fut(7, ready=False)
    pool = pool_for(s, monkeypatch=monkeypatch)
    new = worker(HANG, ready=False)

    async def go():
        s.start()
        add(pool, [new], ["w1"])
        await settle()
        assert pool.pending_joins() == 1 and await pool.admit() == []  # still starting: nothing joins
        new.version.answers[0].ready = True
        await settle()
        assert s.ws.names == ["w0"] and pool.pending_joins() == 1  # ready, joins at the next step boundary
        assert await pool.admit() == [1]
        assert s.ws.names == ["w0", "w1"] and s.sync.group.connected == [["w0", "w1"]]
        assert s.sync.group.resent == [1]
        await settle()
        assert new.run_batch.calls == []  # no batch before its weights
        assert new.set_prompts.calls == [((1, 2),)]  # the prompts re-sharded over the two
        weights.ready = True
        await settle()
        assert s.sync.state.syncs == {"w1": 1} and len(new.run_batch.calls) == 1 and s.ws.awaiting == set()

    run(go())


def test_an_added_worker_before_any_publish_starts_at_once(monkeypatch):
    s = rollouts_with([worker(HANG)])
    pool = pool_for(s, monkeypatch=monkeypatch)
    new = worker(HANG)

    async def go():
        add(pool, [new], ["w1"])
        await settle()
        await pool.admit()
        await settle()
        assert len(new.run_batch.calls) == 1

    run(go())


def test_a_removed_worker_finishes_its_batch_once_then_is_killed_and_the_others_shift():
    last = Fut(STATS, ready=False)
    w0, w1, w2 = worker(HANG), worker(last), worker(HANG)
    s = rollouts_with([w0, w1, w2], publish=lambda v: Delivery(v, {2: Fut(v, ready=False)}))
    pool = pool_for(s)

    async def go():
        s.start()
        await s.sync.publish()
        await settle()
        assert await pool.remove_worker(1) == "w1"
        assert s.ws.names == ["w0", "w2"] and s.sync.group.connected == [["w0", "w2"]]
        assert in_flight(s) == {"batches": ["w0", "w1", "w2"], "syncs": ["w2"]}  # w1's: its last
        assert s.retiring.keys() == {"w1"} and s.ray.killed == []  # not before its batch lands
        assert await s.sync.give("w2") == 0 and s.sync.group.resent == [1]  # w2 is index 1 now
        last.ready = True
        await settle()
        assert s.batches == 1 and s.ray.killed == [w1] and len(w1.run_batch.calls) == 1  # counted, once
        assert in_flight(s) == {"batches": ["w0", "w2"], "syncs": ["w2"]} and not s.retiring

    run(go())


def test_an_idle_removed_worker_is_killed_at_once_and_its_sync_dropped():
    w0, w1 = worker(STATS), worker(STATS)
    s = rollouts_with(
        [w0, w1], publish=lambda v: Delivery(v, {0: Fut(v, ready=False), 1: Fut(v, ready=False)})
    )
    pool = pool_for(s)

    async def go():
        await s.sync.publish()
        await pool.remove_worker(1)
        await settle()
        assert s.ray.killed == [w1] and in_flight(s) == {"batches": [], "syncs": ["w0"]}
        with pytest.raises(ValueError, match="last rollout worker"):
            await pool.remove_worker(0)

    run(go())


def test_a_worker_that_fails_to_start_is_dropped_and_the_run_goes_on():
    s = rollouts_with([worker(STATS)])
    pool = pool_for(s)
    bad = FakeActor(version=Method(Fut(error=RayActorError("constructor raised"))))

    async def go():
        add(pool, [bad], ["w1"])
        await settle()

    run(go())
    assert s.ray.killed == [bad] and pool.pending_joins() == 0 and s.ws.names == ["w0"]
    s.tasks.check()


def test_a_removed_worker_that_hangs_is_abandoned_after_the_sync_timeout():
    w0, w1 = worker(HANG), worker(HANG)
    s = rollouts_with([w0, w1])
    pool = pool_for(s)

    async def go():
        s.start()
        await settle()
        await pool.remove_worker(1)
        assert s.ray.killed == [] and s.retiring.keys() == {"w1"}
        s.check_retiring(now=1e12)
        await settle()
        assert s.ray.killed == [w1] and in_flight(s) == {"batches": ["w0"], "syncs": []}
        assert not s.retiring and "w1" not in s.loops

    run(go())


def test_starting_workers_are_cancelled_newest_first():
    s = rollouts_with([worker(STATS)])
    pool = pool_for(s)
    a, b = worker(ready=False), worker(ready=False)

    async def go():
        add(pool, [a, b], ["w1", "w2"])
        assert pool.cancel_joins(1) == 1 and s.ray.killed == [b] and pool.pending_joins() == 1

    run(go())


def test_the_pool_scales_up_then_down_cancelling_starting_workers_first(monkeypatch):
    s = rollouts_with([worker(STATS), worker(STATS)])
    pool = pool_for(s, monkeypatch=monkeypatch)

    async def go():
        assert await pool.scale_to(4) == {"workers": 2, "joining": 2, "target": 4, "names": ["w0", "w1"]}
        assert sorted(pool.built) == ["w2", "w3"]
        assert (await pool.scale_to(3))["joining"] == 1  # the newest starting worker went first
        assert await pool.scale_to(1) == {"workers": 1, "joining": 0, "target": 1, "names": ["w0"]}
        assert s.ws.handles[0].set_prompts.calls == [((0, 1),)]  # re-sharded over the one left

    run(go())


def test_the_pool_refuses_a_collective_transport_and_impossible_sizes(monkeypatch):
    s = rollouts_with([worker(STATS)])
    with pytest.raises(scaling.ScalingRefused, match="sync.transport=gloo.*object_store"):
        run(pool_for(s, transport_collective=True, monkeypatch=monkeypatch).scale_to(2))
    with pytest.raises(scaling.ScalingRefused, match="between 1 and the number of prompts"):
        run(pool_for(s, prompts=3, monkeypatch=monkeypatch).scale_to(4))


def test_the_autoscaler_adds_on_learner_wait_and_removes_on_a_full_buffer_with_hysteresis(monkeypatch):
    s = rollouts_with([worker(STATS), worker(STATS)])
    pool = pool_for(s, monkeypatch=monkeypatch)
    clock = [0.0]
    a = autoscale.Autoscaler(pool, 1, 3, window_s=10.0, up_wait=0.2, down_wait=0.02, clock=lambda: clock[0])

    def window(wait_s, fill=0.0):
        clock[0] += 10.0
        a.wait += wait_s
        return run(a.tick(a.wait, fill))

    a.wait = 0.0
    assert run(a.tick(0.0, 0.0)) is None  # the first window starts
    assert window(5.0) is None  # waited 50%: one vote up
    assert window(1.0) is None  # 10%: between the thresholds, the vote is reset
    assert window(5.0) is None and window(5.0) == 3  # two windows in a row: a third worker
    assert pool.pending_joins() == 1 and window(9.0) is None  # none while it starts
    pool.cancel_joins()
    s.ws.handles.append(worker(STATS))
    s.ws.names.append("w2")
    assert run(a.tick(a.wait, 0.0)) is None  # a new window starts once it joined
    assert window(9.0) is None and window(9.0) is None  # at max_workers: no more
    assert window(0.0, fill=0.2) is None and window(0.0, fill=0.2) is None  # idle learner, buffer not full
    assert window(0.0, fill=0.9) is None and window(0.0, fill=0.9) == 2  # idle learner, full buffer
    assert a.changes == [(2, 3), (3, 2)]


def test_a_restarted_worker_gets_its_current_shard_back(monkeypatch):
    from tests.unit.fakes import ActorUnavailableError

    w0 = worker(STATS)
    w1 = FakeActor(run_batch=Method(Fut(error=RayActorError("killed")), STATS, HANG), set_prompts=Method(1),
                   __ray_call__=Method(Fut(error=ActorUnavailableError("restarting")), "h:2"))  # fmt: skip
    s = rollouts_with([w0, w1])
    pool = pool_for(s, monkeypatch=monkeypatch)
    pool.reshard()
    assert w1.set_prompts.calls == [((1, 2),)]

    async def go():
        s.add("w1")
        await settle()  # it died: restarted, its shard re-sent, its batch resubmitted

    run(go())
    assert w1.set_prompts.calls == [((1, 2),), ((1, 2),)] and s.restarts.counts == {"w1": 1}
    assert len(w1.run_batch.calls) == 3 and s.batches == 1


def test_a_local_ray_scales_only_within_its_cpus(monkeypatch):
    """`ctl scale 500` on a 2-CPU local Ray is refused, naming the most that fit; a cluster (which an
    autoscaler may grow) still takes it, with a warning."""
    s = rollouts_with([worker(STATS)])
    s.ray.cluster_resources = lambda: {"CPU": 2.0}
    pool = pool_for(s, prompts=1000, monkeypatch=monkeypatch)
    pool.cfg.learner = SimpleNamespace(num_learners=1, cpus_per_learner=1.0, gpus_per_learner=0.0)
    pool.fixed_size = True
    with pytest.raises(scaling.ScalingRefused, match=r"at most 2 rollout workers .* got 500"):
        run(pool.scale_to(500))

    async def go():
        assert (await pool.scale_to(2))["target"] == 2
        pool.fixed_size = False
        assert (await pool.scale_to(500))["joining"] == 499

    run(go())
