"""Weight sync into RolloutWorker actors' vLLM engines, through the senders and receivers training uses
(`sync.transport.sender()` as in learner rank 0, `RolloutWorker.receive_weights` in the worker)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(ray_cluster, tiny_model_dir):
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sm_dist.rollout.engine import RolloutParams
    from sm_dist.rollout.worker import RolloutWorker

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [
        tok.encode(q, add_special_tokens=False) for q in ("In base 7, what is 25 + -3?", "What is 1 + 1?")
    ]

    @ray.remote(num_cpus=0)
    class Collector:
        def __init__(self):
            self.rows = []

        def add(self, batch):
            self.rows += batch.to_pylist()
            return len(self.rows)

        def take(self):
            rows, self.rows = self.rows, []
            return rows

    sink = Collector.remote()
    params = RolloutParams(temperature=1.0, max_actions=16, seed=1)
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(
        "w-sync", str(tiny_model_dir), prompts, params, batch_size=2, sink=sink
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    yield ray, worker, model, tok, prompts, sink
    ray.kill(worker)


@torch.no_grad()
def hf_logprobs(model, prompt, actions):
    seq = torch.tensor([prompt + actions])
    logp = model(seq).logits[0].log_softmax(-1)
    return [float(logp[len(prompt) + i - 1, a]) for i, a in enumerate(actions)]


def _sender(kind: str, workers, names, timeout_s: float = 120.0):
    """Learner rank 0's end of transport `kind`, built and connected as `Learner.publish_weights(workers=..., names=...)` does."""
    from sm_dist.config import SyncConfig

    sender = SyncConfig(transport={"kind": kind}, timeout_s=timeout_s).transport.sender(timeout_s)
    sender.connect(workers, names)
    return sender


def test_object_store_sync_updates_probe_and_version(setup):
    from sm_dist.rollout.worker import probe_logprobs
    from sm_dist.sync.base import deliver

    ray, worker, model, tok, prompts, sink = setup
    probe_prompt = prompts[0]
    probe_actions = tok.encode("12 in base 7.", add_special_tokens=False) + [tok.eos_token_id]

    ray.get(worker.run_batch.remote(), timeout=300)
    assert {r["policy_version"] for r in ray.get(sink.take.remote())} == {0}
    before = ray.get(worker.__ray_call__.remote(probe_logprobs, probe_prompt, probe_actions), timeout=120)
    ref_before = hf_logprobs(model, probe_prompt, probe_actions)
    assert max(abs(a - b) for a, b in zip(before, ref_before, strict=True)) <= 1e-4

    g = torch.Generator().manual_seed(1234)  # perturb every parameter with seeded noise
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref_after = hf_logprobs(model, probe_prompt, probe_actions)
    assert max(abs(a - b) for a, b in zip(ref_after, ref_before, strict=True)) > 1e-2

    sender = _sender("object_store", [worker], ["w-sync"])
    metrics = deliver(sender, 1, model.state_dict())
    assert metrics["sync/version"] == 1 and metrics["sync/bytes"] > 0
    assert ray.get(worker.version.remote()) == 1

    after = ray.get(worker.__ray_call__.remote(probe_logprobs, probe_prompt, probe_actions), timeout=120)
    assert max(abs(a - b) for a, b in zip(after, ref_after, strict=True)) <= 1e-4

    stats = ray.get(worker.run_batch.remote(), timeout=300)
    assert stats["rollout/version"] == 1.0
    rows = ray.get(sink.take.remote())
    assert len(rows) == 2 and {r["policy_version"] for r in rows} == {1}

    # A second publish moves the version on again, and new rows are tagged with it.
    deliver(sender, 2, model.state_dict())
    ray.get(worker.run_batch.remote(), timeout=300)
    rows = ray.get(sink.take.remote())
    assert len(rows) == 2 and {r["policy_version"] for r in rows} == {2}
    assert ray.get(worker.version.remote()) == 2

    # A restarted worker gets the last version again (resend), and confirms it.
    d = sender.resend(0)
    assert d.version == 2 and ray.get(d.pending[0], timeout=120) == 2


def test_sync_timeout_names_worker_and_version(setup):
    """A worker that cannot confirm in time gives a WeightSyncError naming it, the version, the timeout."""
    from sm_dist.sync.base import WeightSyncError, deliver

    ray, *_ = setup

    @ray.remote(num_cpus=0)
    class Hung:
        def receive_weights(self, stage, info, version):
            import time

            time.sleep(30)
            return version

    hung = Hung.remote()
    sender = _sender("object_store", [hung], ["hung-worker"], timeout_s=1.0)
    with pytest.raises(WeightSyncError, match=r"version 7 timed out after 1.0s: \['hung-worker'\]"):
        deliver(sender, 7, {"w": torch.zeros(3)})
    ray.kill(hung)


def test_gloo_broadcast_sync_updates_probe_and_version(setup, tiny_model_dir):
    """The collective path (rendezvous, start/update/finish under the engine lock) with this process as
    learner rank 0, into a worker built as the driver builds it for sync.transport.kind=gloo (threaded, the
    gloo receiver): after a send the worker's log-probs are the new weights'."""
    from sm_dist.rollout.engine import RolloutParams
    from sm_dist.rollout.worker import RolloutWorker, probe_logprobs
    from sm_dist.sync.config import GlooConfig

    ray, _, model, tok, prompts, sink = setup
    worker = ray.remote(num_cpus=1, max_concurrency=2)(RolloutWorker).remote(
        "w-gloo", str(tiny_model_dir), prompts, RolloutParams(max_actions=16, seed=1), batch_size=2, sink=sink,
        transport=GlooConfig(),
    )  # fmt: skip
    probe_actions = tok.encode("4 in base 7.", add_special_tokens=False) + [tok.eos_token_id]
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref = hf_logprobs(model, prompts[1], probe_actions)
    before = ray.get(worker.__ray_call__.remote(probe_logprobs, prompts[1], probe_actions), timeout=120)
    assert max(abs(a - b) for a, b in zip(before, ref, strict=True)) > 1e-2

    sender = _sender("gloo", [worker], ["w-gloo"])  # the rendezvous at this process's address
    d = sender.send(10, model.state_dict())
    assert not d.pending and d.metrics["sync/version"] == 10 and d.metrics["sync/bytes"] > 0
    after = ray.get(worker.__ray_call__.remote(probe_logprobs, prompts[1], probe_actions), timeout=120)
    assert max(abs(a - b) for a, b in zip(after, ref, strict=True)) <= 1e-4
    ray.get(worker.run_batch.remote(), timeout=300)
    assert {r["policy_version"] for r in ray.get(sink.take.remote())} == {10}
    sender.send(11, model.state_dict())  # the group is reused for the next version
    assert ray.get(worker.version.remote()) == 11
    with pytest.raises(Exception, match="cannot rejoin"):  # a collective group takes no restarted worker
        sender.resend(0)
    ray.kill(worker)
