"""Backspace-aware generation on vLLM's CPU build, checked against HF transformers references."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

QUESTIONS = [
    "In base 7, what is 25 + -3?",
    "In base 16, what is -a1 - 3f?",
    "What is 101 + 11 in base 2?",
    "In base 5, what is 4 - 13?",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(q, add_special_tokens=False) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_backspace_greedy(model, prompt, bkspc, eos, max_actions, max_backspaces, forced=()):
    """Reference: greedy on the current state; forced <bkspc> where asked (never at the boundary);
    a <bkspc> pops the last generated token; the (max_backspaces+1)-th one ends with action_cap."""
    gen: list[int] = []
    actions: list[int] = []
    n_bk = 0
    for k in range(max_actions):
        if k in forced and gen:
            a = bkspc
        else:
            logits = model(torch.tensor([prompt + gen])).logits[0, -1]
            if not gen:
                logits[bkspc] = float("-inf")
            a = int(logits.argmax())
        if a == bkspc:
            if n_bk >= max_backspaces:
                return actions, gen, "action_cap"
            n_bk += 1
            gen.pop()
        else:
            gen.append(a)
        actions.append(a)
        if a == eos:
            return actions, gen, "eos"
    return actions, gen, "length"


def test_greedy_worker_actor_equals_hf_generate(ray_cluster, tiny_model_dir, tok, prompts, hf_model):
    """Plain greedy generation (<bkspc> forbidden) through a RolloutWorker actor equals HF's generate."""
    import ray

    from sm_dist.buffer.schema import rows_to_batch
    from sm_dist.rollout.engine import RolloutParams
    from sm_dist.rollout.worker import RolloutWorker

    @ray.remote(num_cpus=0)
    class Collector:
        def __init__(self):
            self.batches = []

        def add(self, batch):
            self.batches.append(batch)
            return sum(b.num_rows for b in self.batches)

        def rows(self):
            return [r for b in self.batches for r in b.to_pylist()]

    sink = Collector.remote()
    params = RolloutParams(temperature=0.0, max_actions=24, forbid_bkspc=True)
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(
        "w-greedy",
        str(tiny_model_dir),
        prompts,
        params,
        batch_size=len(prompts),
        sink=sink,
        worker_extension_cls=None,
    )
    stats = ray.get(worker.run_batch.remote(), timeout=300)
    rows = ray.get(sink.rows.remote())
    ray.kill(worker)
    assert stats["rollout/rollouts"] == len(prompts) and stats["rollout/backspace_rate"] == 0.0
    assert len(rows) == len(prompts)
    bid = tok.convert_tokens_to_ids("<bkspc>")
    for p, row in zip(prompts, rows, strict=True):
        ref = hf_model.generate(
            torch.tensor([p]),
            do_sample=False,
            max_new_tokens=24,
            bad_words_ids=[[bid]],
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(p) :].tolist()
        assert row["prompt_ids"] == p
        assert row["action_ids"] == ref, (tok.decode(row["action_ids"]), tok.decode(ref))
        assert row["final_ids"] == ref and bid not in ref
        assert row["finish_reason"] == ("eos" if ref[-1] == tok.eos_token_id else "length")
        assert row["source"] == "model" and row["policy_version"] == 0 and row["worker_id"] == "w-greedy"
        assert len(row["logprobs"]) == len(ref) and all(lp <= 0 for lp in row["logprobs"])
    rows_to_batch(rows)  # the rows round-trip through the buffer schema


@pytest.mark.parametrize(
    "forced, max_backspaces",
    [((), 8), ((2, 5, 6, 11), 8), ((0, 1, 3, 4, 9, 10, 11), 8), (tuple(range(1, 40, 2)), 3)],
    ids=["model-only", "scattered", "to-boundary", "write-delete-loop"],
)
def test_backspace_rollback_matches_hf_reference(engine, prompts, hf_model, tok, forced, max_backspaces):
    """Forced and model-chosen <bkspc> actions: same trace, collapse and finish as the HF rollback loop."""
    from sm_dist.core.traces import collapse
    from sm_dist.rollout.engine import RolloutParams

    bid, eos = engine.bkspc_id, tok.eos_token_id
    params = RolloutParams(
        temperature=0.0, max_actions=24, max_backspaces=max_backspaces, force_bkspc_at=forced
    )
    rollouts = engine.generate(prompts, params)
    for p, r in zip(prompts, rollouts, strict=True):
        actions, gen, finish = hf_backspace_greedy(hf_model, p, bid, eos, 24, max_backspaces, set(forced))
        assert r.action_ids == actions, (forced, r.action_ids, actions)
        assert r.final_ids == gen == collapse(p + r.action_ids, bid, len(p))[len(p) :]
        assert r.finish_reason == finish
        assert r.num_backspaces == r.action_ids.count(bid) <= max_backspaces
        assert len(r.logprobs) == len(r.action_ids)
        for k in forced:  # a forced <bkspc> has probability 1 under the processed distribution
            if k < len(r.action_ids) and r.action_ids[k] == bid:
                assert r.logprobs[k] == 0.0
    if forced and forced[0] == 1 and max_backspaces == 3:  # the write/delete loop ends on the cap
        assert all(r.finish_reason == "action_cap" and r.num_backspaces == 3 for r in rollouts)
    if forced and forced[0] == 0:  # step 0 is the boundary: the forced <bkspc> must not happen there
        assert all(r.action_ids[0] != bid for r in rollouts)


def test_bkspc_never_at_prompt_boundary_when_sampling(engine, prompts):
    """Under sampling with <bkspc> forced at every step, every <bkspc> deletes a generated token."""
    from sm_dist.rollout.engine import RolloutParams

    bid = engine.bkspc_id
    params = RolloutParams(
        temperature=1.0,
        max_actions=32,
        max_backspaces=100,
        samples_per_prompt=4,
        seed=3,
        force_bkspc_rate=0.5,
    )
    rollouts = engine.generate(prompts, params)
    assert len(rollouts) == 4 * len(prompts)
    total_bk = 0
    for r in rollouts:
        depth = 0
        for a in r.action_ids:
            if a == bid:
                assert depth > 0, f"<bkspc> at the prompt boundary in {r.action_ids}"
                depth -= 1
            else:
                depth += 1
        assert depth == len(r.final_ids)
        total_bk += r.num_backspaces
    assert total_bk > 0
    # Same seed, same rollouts: the per-request seeds are derived deterministically.
    again = engine.generate(prompts, params)
    assert [r.action_ids for r in again] == [r.action_ids for r in rollouts]


def _writes_at_deleted_states(action_ids, bid):
    """Replay a trace: (state, token) pairs where a token is written at a state it was deleted at."""
    stack: list[int] = []
    deleted: dict[tuple[int, ...], set[int]] = {}
    repeats = []
    for a in action_ids:
        if a == bid:
            t = stack.pop()
            deleted.setdefault(tuple(stack), set()).add(t)
        else:
            if a in deleted.get(tuple(stack), ()):
                repeats.append((tuple(stack), a))
            stack.append(a)
    return repeats


def test_search_does_not_rewrite_deleted_tokens(engine, prompts):
    """Greedy rewrites the token it just deleted (the loop); search never re-chooses a deleted token."""
    from sm_dist.rollout.engine import RolloutParams

    bid = engine.bkspc_id
    forced = (1, 3, 5, 7)  # write, delete, write, delete, ... always at the empty continuation
    # max_backspaces leaves room for the tiny model's own occasional <bkspc> beyond the forced ones
    common = dict(temperature=0.0, max_actions=24, max_backspaces=12, force_bkspc_at=forced)
    greedy = engine.generate(prompts, RolloutParams(**common))
    search = engine.generate(prompts, RolloutParams(**common, no_repeat_deleted=True))
    for g, s in zip(greedy, search, strict=True):
        assert g.action_ids[1:8:2] == s.action_ids[1:8:2] == [bid] * 4, (g.action_ids, s.action_ids)
        assert len(set(g.action_ids[0:9:2])) == 1  # greedy: the same token after every deletion
        assert len(set(s.action_ids[0:9:2])) == 5  # search: a new token at each retry
        assert g.action_ids[0] == s.action_ids[0]  # nothing deleted yet: the same greedy choice
        assert _writes_at_deleted_states(s.action_ids, bid) == []
        assert s.finish_reason != "action_cap" and s.num_backspaces >= len(forced)
    # Sampling with many backspaces at every depth: the rule holds at every state, not only the first.
    params = RolloutParams(
        temperature=1.0,
        max_actions=48,
        max_backspaces=100,
        samples_per_prompt=3,
        seed=5,
        force_bkspc_rate=0.5,
        no_repeat_deleted=True,
    )
    sampled = engine.generate(prompts, params)
    assert sum(r.num_backspaces for r in sampled) > 20
    assert all(_writes_at_deleted_states(r.action_ids, bid) == [] for r in sampled)
    plain = engine.generate(prompts, RolloutParams(**{**params.__dict__, "no_repeat_deleted": False}))
    assert any(_writes_at_deleted_states(r.action_ids, bid) for r in plain)  # the rule is what helps


def test_forced_prefixes_are_deletable_actions(engine, prompts, tok):
    """A forced prefix starts the trace, counts as actions and can be deleted by <bkspc>."""
    from sm_dist.core.traces import collapse
    from sm_dist.rollout.engine import RolloutParams

    bid = engine.bkspc_id
    prefixes = [tok.encode(t, add_special_tokens=False) for t in ("12", "a", "101", "4")]
    params = RolloutParams(
        temperature=1.0, max_actions=12, samples_per_prompt=2, seed=1, force_bkspc_at=(1, 2, 3)
    )
    rollouts = engine.generate(prompts, params, prefixes=prefixes)
    assert len(rollouts) == 2 * len(prompts)
    for r in rollouts:
        pre = prefixes[r.prompt_index]
        n = len(pre)
        assert r.action_ids[:n] == pre and r.logprobs[:n] == [0.0] * n
        assert len(r.action_ids) <= 12 and len(r.logprobs) == len(r.action_ids)
        # forced <bkspc> at absolute indices >= n delete prefix tokens (index < n lies in the prefix)
        want = [k for k in (1, 2, 3) if k >= n][:n]
        assert [r.action_ids[k] for k in want] == [bid] * len(want), (pre, r.action_ids)
        assert r.prompt_ids + r.final_ids == collapse(r.prompt_ids + r.action_ids, bid, len(r.prompt_ids))
    with pytest.raises(ValueError, match="plain continuation tokens"):
        engine.generate(prompts[:1], params, prefixes=[[tok.eos_token_id]])
    with pytest.raises(ValueError, match="1 prefixes for 2 prompts"):
        engine.generate(prompts[:2], params, prefixes=[[1]])


def test_bkspc_bias_controls_how_often_it_fires(engine, prompts):
    """+50 on the <bkspc> logit makes it fire at every allowed step (never at the boundary); with a
    bias of +4 sampled backspaces are common, with -56 there are none."""
    from sm_dist.rollout.engine import RolloutParams

    bid = engine.bkspc_id
    base = dict(temperature=1.0, max_actions=12, max_backspaces=20, samples_per_prompt=4, seed=5)
    always = engine.generate(prompts, RolloutParams(**base, bkspc_bias=50.0))
    for r in always:  # write, delete, write, delete, ...: alternating after the boundary
        assert r.action_ids[1::2] == [bid] * len(r.action_ids[1::2]), r.action_ids
        assert bid not in r.action_ids[0::2]
    some = engine.generate(prompts, RolloutParams(**base, bkspc_bias=4.0))
    none = engine.generate(prompts, RolloutParams(**base, bkspc_bias=-56.0))
    assert sum(r.num_backspaces for r in some) > 0
    assert sum(r.num_backspaces for r in none) == 0


def test_seeded_sampling_of_a_batch_larger_than_a_default_step_budget(engine, prompts):
    """Regression: 600 seeded rollouts of ~40-token prompts (24k prompt tokens) once made vLLM chunk a
    prefill and rewind a CPU generator ("CPU Generator does not use offset"); the engine now never
    chunks a prefill on the CPU."""
    from sm_dist.rollout.engine import RolloutParams

    prompts = [(prompts[k % len(prompts)] * 3)[: 30 + k % 11] for k in range(150)]
    params = RolloutParams(temperature=1.0, max_actions=8, samples_per_prompt=4, seed=11, logprobs=False)
    rollouts = engine.generate(prompts, params)
    assert len(rollouts) == 600
    assert [r.action_ids for r in engine.generate(prompts, params)] == [r.action_ids for r in rollouts]
