"""Start-up waits: the first failed actor call raises at once, naming its actor (one learner rank that
fails its rendezvous would otherwise leave the driver waiting out run.startup_timeout_s for the ranks
stuck waiting for it), and rank 0's rendezvous port is held from the moment it is reported."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from sm_dist.errors import ActorStartError
from sm_dist.orchestrator.actors import _wait


class TaskError(Exception):
    pass


class Ref:
    def __init__(self, value=None, error=None, ready=True):
        self.value, self.error, self.ready = value, error, ready


class Ray:
    exceptions = SimpleNamespace(RayError=TaskError)

    def wait(self, refs, num_returns=1, timeout=None):
        ready = [r for r in refs if r.ready][:num_returns]
        if not ready and timeout:
            time.sleep(min(timeout, 0.01))
        return ready, [r for r in refs if r not in ready]

    def get(self, refs):
        for r in refs if isinstance(refs, list) else [refs]:
            if r.error is not None:
                raise r.error
        return [r.value for r in refs] if isinstance(refs, list) else refs.value


def test_a_failed_rank_raises_at_once_naming_it_while_another_still_waits():
    hung = Ref(ready=False)  # rank 1: waits for rank 0 in its rendezvous, never answers
    failed = Ref(error=TaskError("DistNetworkError: address already in use"))
    t0 = time.monotonic()
    with pytest.raises(ActorStartError, match="address already in use") as e:
        _wait(Ray(), [failed, hung], ["learner rank 0", "learner rank 1"], timeout_s=60.0)
    assert time.monotonic() - t0 < 5.0 and e.value.what == "learner rank 0"


def test_a_timeout_names_the_late_actors_and_results_come_in_order():
    assert _wait(Ray(), [Ref(1), Ref(2)], ["a", "b"], timeout_s=1.0) == [1, 2]
    with pytest.raises(ActorStartError, match=r"\['rollout worker w1'\] not ready \(1/2 were\)") as e:
        _wait(Ray(), [Ref(1), Ref(ready=False)], ["rollout worker w0", "rollout worker w1"], timeout_s=0.05)
    assert e.value.what == "run.startup_timeout_s"


def test_rank_0_holds_its_rendezvous_port_from_the_moment_it_reports_it():
    import torch.distributed as dist

    from sm_dist.learner.learner import Learner

    rank0 = SimpleNamespace(world_size=2, _store=None)
    port = Learner._host_store(rank0, "127.0.0.1", 0)
    with socket.socket() as s, pytest.raises(OSError):  # nothing else can take it meanwhile
        s.bind(("127.0.0.1", port))
    client = dist.TCPStore("127.0.0.1", port, 2, False)  # what rank 1's join dials
    client.set("k", "v")
    assert rank0._store.get("k") == b"v"
