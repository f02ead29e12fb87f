"""Trace collapsing, noise augmentation and the single-pass layout (DESIGN §2)."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sm_dist.core.traces import INF_POS, augment_noise, build_inputs, collapse, collate, pack_rows

BK = 9
tokens = st.integers(min_value=0, max_value=8)
actions = st.lists(st.one_of(tokens, st.just(BK)), max_size=30)
prompts = st.lists(tokens, min_size=1, max_size=6)


def test_collapse_examples():
    assert collapse([1, 2, BK, 3], BK) == [1, 3]
    assert collapse([BK, BK, 1], BK) == [1]
    assert collapse([1, 2, BK, BK, BK, 3], BK, prompt_len=1) == [1, 3]
    with pytest.raises(ValueError, match="prompt_len"):
        collapse([1], BK, prompt_len=2)


@settings(max_examples=200, deadline=None)
@given(prompts, actions)
def test_layout_properties(prompt, acts):
    tr = build_inputs(prompt, acts, BK)
    P, T = len(prompt), len(acts)
    assert tr.input_ids.numel() == P + T
    assert BK not in tr.input_ids.tolist()  # <bkspc> is never an input
    for t in range(T + 1):
        state = collapse(prompt + acts[:t], BK, prompt_len=P)
        i = int(tr.state_index[t])
        # the tokens visible to the state's last input are exactly the collapsed state, in order
        visible = [k for k in range(i + 1) if i < int(tr.deleted_at[k])]
        assert tr.input_ids[visible].tolist() == state
        assert tr.position_ids[visible].tolist() == list(range(len(state)))
        assert int(tr.position_ids[i]) == len(state) - 1  # position id = state length - 1
        assert bool(tr.bkspc_allowed[t]) == (len(state) > P)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(prompts, actions), min_size=1, max_size=4))
def test_survivors_see_only_survivors_and_split_plan_is_exact(batch):
    """The fact `attn="split"` rests on: an input that is never deleted sees no deleted input, so the
    survivors are a plain causal sequence; and the plan (survivors first, a causal prefix, the rest
    under the full mask) is exact and invertible."""
    from sm_dist.core.masks import dense_mask
    from sm_dist.core.split_attn import make_split_plan

    b = collate([build_inputs(p, a, BK) for p, a in batch])
    full = dense_mask(b.deleted_at)[:, 0]  # [B, q, k]
    surv = b.deleted_at >= INF_POS
    for r in range(len(batch)):
        s = surv[r]
        assert not (full[r][s][:, ~s]).any()  # survivor queries x deleted keys: nothing visible
    plan = make_split_plan(b.deleted_at)
    B, N = b.deleted_at.shape
    idx = torch.arange(N).expand(B, N)
    assert torch.equal(plan.perm.gather(1, plan.inv), idx)  # inv is perm's inverse
    slot_surv = surv.gather(1, plan.perm)
    c = plan.n_causal
    assert bool(slot_surv[:, :c].all())  # the causal prefix holds only survivors, in every row
    assert c == int(surv.sum(1).min())  # and is as long as it can be
    for r in range(B):
        s = plan.perm[r][slot_surv[r]]
        assert torch.equal(s, torch.sort(s).values)  # survivors keep input order: causal is exact
        # masked-part rows are the full mask's rows, queries and keys both in slot order
        want = full[r][plan.perm[r, c:]][:, plan.perm[r]]
        assert torch.equal(plan.del_mask[r, 0], want)


@settings(max_examples=100, deadline=None)
@given(prompts, st.lists(tokens, max_size=20))
def test_no_backspace_is_plain_causal(prompt, acts):
    tr = build_inputs(prompt, acts, BK)
    assert tr.input_ids.tolist() == prompt + acts
    assert tr.position_ids.tolist() == list(range(len(prompt) + len(acts)))
    assert bool((tr.deleted_at == INF_POS).all())
    assert not tr.has_backspace
    assert not collate([tr]).any_backspace


@settings(max_examples=100, deadline=None)
@given(st.lists(tokens, max_size=20), st.floats(0, 1), st.integers(0, 1000))
def test_augment_collapses_to_target(target, p, seed):
    acts, noise = augment_noise(target, BK, p, list(range(9)), random.Random(seed))
    assert collapse(acts, BK) == target
    assert len(noise) == len(acts)
    for i, is_n in enumerate(noise):
        if is_n:
            assert acts[i + 1] == BK and acts[i] != acts[i + 2]


def test_augment_is_seeded():
    a = augment_noise(list(range(8)) * 4, BK, 0.3, list(range(9)), random.Random(5))
    b = augment_noise(list(range(8)) * 4, BK, 0.3, list(range(9)), random.Random(5))
    assert a == b


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="empty prompt"):
        build_inputs([], [1, 2], BK)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_inputs([1], [1, 42], BK, vocab_size=10)
    with pytest.raises(ValueError, match="appears in the prompt"):
        build_inputs([1, BK], [1], BK)
    with pytest.raises(ValueError, match="<eos>"):
        build_inputs([1], [3, 2, 3], BK, eos_id=2)
    with pytest.raises(ValueError, match="p_noise"):
        augment_noise([1], BK, 1.5, [1, 2], random.Random(0))
    with pytest.raises(ValueError, match="contains the <bkspc>"):
        augment_noise([1], BK, 0.5, [1, BK], random.Random(0))


def test_collate_pads_and_flags():
    a = build_inputs([1, 2], [3, BK, 4], BK, eos_id=None)
    b = build_inputs([1], [5, 6, 7, 8, 2], BK, eos_id=2, is_noise=[False, True, False, False, False])
    batch = collate([a, b])
    assert batch.input_ids.shape == (2, 6)
    assert batch.lengths.tolist() == [5, 6]
    assert batch.action_mask.sum(1).tolist() == [3, 5]
    assert batch.terminal.tolist() == [False, True]
    assert batch.is_noise[1].tolist() == [False, True, False, False, False]
    assert batch.any_backspace
    assert torch.equal(batch.state_index[0, :4], a.state_index)


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 2, 4, 1], capacity=5)
    assert sorted(sorted(r) for r in rows) == [[0], [1, 2], [3, 4]]
    assert all(sum([5, 3, 2, 4, 1][i] for i in r) <= 5 for r in rows)
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([6], capacity=5)


def test_packed_collate_lays_each_trace_out_as_its_own_segment():
    """Positions restart, deleted_at and state_index shift by the segment's offset, each sequence
    knows its row; the per-sequence arrays are the unpacked ones."""
    a = build_inputs([1, 2], [3, BK, 4], BK)  # 5 inputs
    b = build_inputs([1], [5, 6], BK)  # 3 inputs
    c = build_inputs([7], [8, BK, BK, 6, 5, 4, 3], BK)  # 8 inputs: the row length
    packed, plain = collate([a, b, c], pack=True, pack_length=8), collate([a, b, c])
    assert packed.input_ids.shape == (2, 8) and packed.row.tolist() == [1, 1, 0]
    assert packed.input_ids[1, :5].tolist() == a.input_ids.tolist()
    assert packed.input_ids[0].tolist() == c.input_ids.tolist()
    assert packed.position_ids[1, 5].item() == b.position_ids[0].item() == 0  # restarts
    assert packed.seg_start[1].tolist() == [0] * 5 + [5] * 3
    assert packed.deleted_at[1, 5:].tolist() == [INF_POS] * 3
    assert packed.deleted_at[1, :5].tolist() == a.deleted_at.tolist()
    assert packed.state_index[1, :3].tolist() == (b.state_index + 5).tolist()
    for k in ("actions", "action_mask", "bkspc_allowed", "is_noise", "boundary_b", "boundary_t", "lengths"):
        assert torch.equal(getattr(packed, k), getattr(plain, k)), k
    flat = packed.flat_state_index()
    assert flat[1, 0].item() == 1 * 8 + 5 and flat[2, 0].item() == 0 * 8 + 0


def test_self_correction_starts_from_the_first_own_mistake():
    from sm_dist.core.traces import self_correction

    BK, EOS = 99, 98
    target = [1, 2, 3, EOS]
    acts, noise = self_correction([1, 5, 3, EOS], target, BK, EOS)
    assert acts == [1, 5, BK, 2, 3, EOS] and noise == [False, True, False, False, False, False]
    assert collapse(acts, BK) == target
    assert self_correction([1, 2, 3, 7, EOS], target, BK, EOS)[0] == [1, 2, 3, 7, BK, EOS]  # eos was due
    assert self_correction(target, target, BK, EOS) is None  # right
    assert self_correction([1, 2], target, BK, EOS) is None  # truncated, no wrong token yet
    assert self_correction([1, EOS], target, BK, EOS) is None  # stopped early: eos cannot be deleted
