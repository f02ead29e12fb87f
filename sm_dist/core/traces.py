"""Backspace action traces: collapsing, noise augmentation, and the single-pass layout (DESIGN §2).

A *trace* is a prompt plus a list of actions. An action is a token (appends), `<eos>` (terminal) or
`<bkspc>` (deletes the last generated token; a no-op at the prompt boundary). The single-pass layout
gives every action one input position, so a trace with backspaces costs one forward pass of the same
length as MLE; a per-position "deleted_at" index defines which keys each query may see.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

INF_POS = 2**62  # "never deleted"


def collapse(action_ids: Sequence[int], bkspc_id: int, prompt_len: int = 0) -> list[int]:
    """Apply the backspaces in `action_ids` and return the collapsed sequence.

    The first `prompt_len` entries of `action_ids` are a protected prompt: a `<bkspc>` never deletes
    them (it is a no-op at that boundary). The result includes the prompt.
    """
    if prompt_len < 0 or prompt_len > len(action_ids):
        raise ValueError(f"prompt_len={prompt_len} outside [0, {len(action_ids)}] (len(action_ids))")
    prompt = list(action_ids[:prompt_len])
    if bkspc_id in prompt:
        raise ValueError(f"<bkspc> id {bkspc_id} appears inside the prompt (first {prompt_len} ids)")
    stack = prompt
    for a in action_ids[prompt_len:]:
        if a == bkspc_id:
            if len(stack) > prompt_len:
                stack.pop()
        else:
            stack.append(int(a))
    return stack


def augment_noise(
    target_ids: Sequence[int],
    bkspc_id: int,
    p_noise: float,
    noise_ids: Sequence[int],
    rng: random.Random,
    avoid_true: bool = True,
) -> tuple[list[int], list[bool]]:
    """Insert `noise, <bkspc>` before each true token with probability `p_noise` (paper's augmentation).

    Returns `(action_ids, is_noise)`: `is_noise[i]` marks the noise actions (whose imitation the
    objective can mask out, `mask_noise_actions`). With `avoid_true`, a noise token differs from the
    true token it precedes, so every noise action is a real mistake. `collapse(action_ids)` always
    equals `target_ids`.
    """
    if not 0.0 <= p_noise <= 1.0:
        raise ValueError(f"p_noise={p_noise} must be in [0, 1]")
    if bkspc_id in noise_ids:
        raise ValueError(f"noise_ids contains the <bkspc> id {bkspc_id}")
    if p_noise > 0 and len(noise_ids) < (2 if avoid_true else 1):
        raise ValueError(f"noise_ids has {len(noise_ids)} ids; need at least 2 to draw a wrong token")
    actions: list[int] = []
    is_noise: list[bool] = []
    for t in target_ids:
        if p_noise > 0 and rng.random() < p_noise:
            n = rng.choice(noise_ids)
            while avoid_true and n == t:
                n = rng.choice(noise_ids)
            actions += [int(n), bkspc_id]
            is_noise += [True, False]
        actions.append(int(t))
        is_noise.append(False)
    return actions, is_noise


def self_correction(
    final_ids: Sequence[int], target_ids: Sequence[int], bkspc_id: int, eos_id: int
) -> tuple[list[int], list[bool]] | None:
    """An expert trace that starts from the model's own first mistake: `(action_ids, is_noise)`.

    `final_ids`: a rollout's collapsed continuation; `target_ids`: the expert answer ending with eos.
    At the first position i where the rollout leaves the only correct continuation (exact match),
    the trace is target[:i] + [wrong, <bkspc>] + target[i:], with the wrong token flagged as noise
    (not imitated with mask_noise_actions): the model's own mistake, then its repair. None when the
    rollout is right, stops short without a wrong token (truncated), or its mistake is an early
    eos (a terminal action cannot be deleted).
    """
    n = min(len(final_ids), len(target_ids))
    i = next((k for k in range(n) if final_ids[k] != target_ids[k]), None)
    if i is None or final_ids[i] in (eos_id, bkspc_id):
        return None
    actions = [*map(int, target_ids[:i]), int(final_ids[i]), bkspc_id, *map(int, target_ids[i:])]
    return actions, [False] * i + [True, False] + [False] * (len(target_ids) - i)


@dataclass
class TraceInputs:
    """The single-pass layout of one trace (DESIGN §2). Shapes: N = P + T inputs, T actions.

    input_ids, position_ids, deleted_at: [N] int64, the model inputs and the visibility data
        (key k is visible to query q iff k <= q < deleted_at[k]).
    state_index: [T+1] int64, the input position whose logits are l(.|s_t), for s_0 .. s_T.
    actions: [T] int64, a_t (the label read at state_index[t]; may be <bkspc> or <eos>).
    bkspc_allowed: [T+1] bool, False where s_t's generated part is empty (<bkspc> masked out there).
    terminal: True if the last action is <eos> (then V(s_T) = 0, else s_T bootstraps with its own V).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    deleted_at: torch.Tensor
    state_index: torch.Tensor
    actions: torch.Tensor
    bkspc_allowed: torch.Tensor
    terminal: bool
    prompt_len: int
    is_noise: torch.Tensor  # [T] bool: the action is an injected noise token (augmented data)
    from_data: bool = True  # source: augmented expert data (True) or a model rollout (False)

    @property
    def num_actions(self) -> int:
        return int(self.actions.numel())

    @property
    def has_backspace(self) -> bool:
        return bool((self.deleted_at < INF_POS).any())


def build_inputs(
    prompt_ids: Sequence[int],
    action_ids: Sequence[int],
    bkspc_id: int,
    eos_id: int | None = None,
    vocab_size: int | None = None,
    is_noise: Sequence[bool] | None = None,
    from_data: bool = True,
) -> TraceInputs:
    """Lay out a trace for one masked forward pass (DESIGN §2, the stack walk).

    Every action gets one input: a token is appended with position id = current state length; a
    `<bkspc>` pops the last generated token and re-inputs a *copy* of the new last token (same id,
    same position id) that replaces it, so the copy's logits are l(.|s) of the collapsed state. An
    action after `<eos>` is an error; an `<eos>` is terminal and needs no input of its own, but one is
    laid out anyway (ignored) to keep N = P + T.
    """
    _check_ids(prompt_ids, action_ids, bkspc_id, eos_id, vocab_size)
    if is_noise is not None and len(is_noise) != len(action_ids):
        raise ValueError(f"is_noise has {len(is_noise)} flags for {len(action_ids)} actions")
    P, T = len(prompt_ids), len(action_ids)
    input_ids, position_ids, deleted_at, bkspc_allowed = _stack_walk(prompt_ids, action_ids, bkspc_id)
    terminal = T > 0 and eos_id is not None and action_ids[-1] == eos_id
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return TraceInputs(
        input_ids=as_long(input_ids),
        position_ids=as_long(position_ids),
        deleted_at=as_long(deleted_at),
        state_index=as_long([P - 1 + t for t in range(T + 1)]),
        actions=as_long(list(action_ids)),
        bkspc_allowed=torch.tensor(bkspc_allowed, dtype=torch.bool),
        terminal=bool(terminal),
        prompt_len=P,
        is_noise=torch.tensor(list(is_noise) if is_noise is not None else [False] * T, dtype=torch.bool),
        from_data=from_data,
    )


def _stack_walk(
    prompt_ids: Sequence[int], action_ids: Sequence[int], bkspc_id: int
) -> tuple[list[int], list[int], list[int], list[bool]]:
    """The stack walk of `build_inputs`: (input_ids, position_ids, deleted_at) of the N = P + T inputs
    and bkspc_allowed of the T + 1 states. `stack` holds the input positions of the current state."""
    P, T = len(prompt_ids), len(action_ids)
    input_ids = list(prompt_ids) + [0] * T
    position_ids = list(range(P)) + [0] * T
    deleted_at = [INF_POS] * (P + T)
    stack = list(range(P))
    bkspc_allowed = [False]
    for t, a in enumerate(action_ids):
        i = P + t
        if a == bkspc_id:
            if len(stack) > P:
                deleted_at[stack.pop()] = i
            last = stack[-1]
            input_ids[i], position_ids[i] = input_ids[last], position_ids[last]
            deleted_at[last] = i
            stack[-1] = i
        else:
            input_ids[i], position_ids[i] = int(a), len(stack)
            stack.append(i)
        bkspc_allowed.append(len(stack) > P)
    return input_ids, position_ids, deleted_at, bkspc_allowed


def _check_ids(prompt_ids, action_ids, bkspc_id, eos_id, vocab_size) -> None:
    if len(prompt_ids) == 0:
        raise ValueError(
            "empty prompt: the state s_0 needs at least one input token; prepend a <bos> (tokenizer.bos_token_id)"
        )
    if bkspc_id in prompt_ids:
        raise ValueError(
            f"<bkspc> id {bkspc_id} appears in the prompt {list(prompt_ids)[:16]}...: it is an action only"
        )
    if eos_id is not None and eos_id in list(action_ids)[:-1]:
        raise ValueError(
            f"<eos> id {eos_id} appears before the last action: nothing follows a terminal state"
        )
    if vocab_size is not None:
        for name, ids in (("prompt_ids", prompt_ids), ("action_ids", action_ids)):
            bad = [x for x in ids if not 0 <= x < vocab_size]
            if bad:
                raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab_size}): {bad[:8]}")
        if not 0 <= bkspc_id < vocab_size:
            raise ValueError(f"<bkspc> id {bkspc_id} is outside the model's vocabulary [0, {vocab_size})")


@dataclass
class TraceBatch:
    """A batch of B traces (sequences) laid out in R model rows of N inputs, right-padded.

    Unpacked (`collate(pack=False)`): one trace per row, R = B, row = arange(B). Packed: several traces
    per row, each its own segment (positions restart at 0, no attention across segments, the
    `<bkspc>` rule inside each): key k is visible to query q iff seg_start[q] <= k <= q < deleted_at[k].

    Model inputs, per row: input_ids, position_ids, deleted_at: [R, N]; seg_start: [R, N] (the first
    input of each input's segment) or None when unpacked. Per sequence: row [B] (its row);
    lengths [B] (its inputs); state_index [B, T+1] (input position *within its row* of s_0 .. s_T,
    padded with 0), actions [B, T] (padded with 0), action_mask [B, T] bool, bkspc_allowed [B, T+1]
    bool, terminal [B] bool, is_noise [B, T] bool, from_data [B] bool, seq_weight [B] float (1 by
    default; expectations are weighted means over sequences, which lets exact enumerations carry their
    probabilities). any_backspace: whether any row needs the mask. boundary_b, boundary_t: [K] indices
    of the states s_t at the prompt boundary (<bkspc> masked there); has_data, has_model: whether any
    sequence is data / a model rollout. All computed on the host at collation, so the objective needs
    no device-to-host synchronisation.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    deleted_at: torch.Tensor
    lengths: torch.Tensor
    state_index: torch.Tensor
    actions: torch.Tensor
    action_mask: torch.Tensor
    bkspc_allowed: torch.Tensor
    terminal: torch.Tensor
    any_backspace: bool
    is_noise: torch.Tensor
    from_data: torch.Tensor
    seq_weight: torch.Tensor
    boundary_b: torch.Tensor
    boundary_t: torch.Tensor
    has_data: bool
    has_model: bool
    row: torch.Tensor | None = None  # [B] long; None: sequence b is row b
    seg_start: torch.Tensor | None = None  # [R, N] long; None: one segment per row

    def __post_init__(self):
        if self.row is None:
            self.row = torch.arange(self.actions.shape[0], device=self.actions.device)

    @property
    def packed(self) -> bool:
        return self.seg_start is not None

    def flat_state_index(self) -> torch.Tensor:
        """[B, T+1]: index of each state's input in the [R * N] flattened positions."""
        assert self.row is not None
        return self.row[:, None] * self.input_ids.shape[1] + self.state_index

    def real_states(self) -> torch.Tensor:
        """[B, T+1] bool: s_0 .. s_{T_b} of each sequence (not padding)."""
        T1 = self.state_index.shape[1]
        idx = torch.arange(T1, device=self.action_mask.device)[None, :]
        return idx <= self.action_mask.sum(1, keepdim=True)

    def to(self, device) -> TraceBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return TraceBatch(**moved)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: trace indices per row, each row's lengths summing to <= capacity."""
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a trace of {max(lengths)} inputs does not fit a packed row of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        r = next((j for j, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[r].append(i)
            room[r] -= lengths[i]
    return rows


def collate(
    traces: Sequence[TraceInputs],
    pad_id: int = 0,
    pad_to_multiple: int = 1,
    pack: bool = False,
    pack_length: int = 0,
) -> TraceBatch:
    """Lay traces out in rows, right-padded: one a row, or (`pack`) several a row, first-fit
    decreasing into rows of `pack_length` inputs (0: twice the longest trace; never shorter than the
    longest). Pad inputs attend only to earlier keys (of their own segment); they are never read."""
    if not traces:
        raise ValueError("collate needs at least one trace")
    B = len(traces)
    lens = [int(t.input_ids.numel()) for t in traces]
    layout, N = _row_layout(lens, pack, pack_length, pad_to_multiple)
    rows = _fill_rows(traces, lens, layout, N, pad_id)
    bkspc_allowed, action_mask = rows["bkspc_allowed"], rows["action_mask"]
    real_state = torch.arange(bkspc_allowed.shape[1])[None, :] <= action_mask.sum(1, keepdim=True)
    boundary = (~bkspc_allowed & real_state).nonzero(as_tuple=True)
    seg_start = rows.pop("seg_start")
    return TraceBatch(
        **rows,
        lengths=torch.tensor(lens, dtype=torch.long),
        terminal=torch.tensor([t.terminal for t in traces], dtype=torch.bool),
        any_backspace=any(t.has_backspace for t in traces),
        from_data=torch.tensor([t.from_data for t in traces], dtype=torch.bool),
        seq_weight=torch.ones(B),
        boundary_b=boundary[0],
        boundary_t=boundary[1],
        has_data=any(t.from_data for t in traces),
        has_model=not all(t.from_data for t in traces),
        seg_start=seg_start if pack else None,
    )


def _row_layout(
    lens: list[int], pack: bool, pack_length: int, pad_to_multiple: int
) -> tuple[list[list[int]], int]:
    """(trace indices per row, the row length N): one trace a row, or packed first-fit decreasing."""
    N = max(lens)
    if pack:  # rows no longer than needed: the fullest row, not pack_length, sets N
        layout = pack_rows(lens, max(N, pack_length or 2 * N))
        N = max(sum(lens[b] for b in row) for row in layout)
    else:
        layout = [[b] for b in range(len(lens))]
    return layout, -(-N // pad_to_multiple) * pad_to_multiple


def _fill_rows(
    traces: Sequence[TraceInputs], lens: list[int], layout: list[list[int]], N: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """The R = len(layout) rows of N inputs ([R, N] tensors) and the per-sequence tensors ([B, T] and
    [B, T+1], TraceBatch's docstring), each trace at its offset in its row, right-padded."""
    B, R, T = len(traces), len(layout), max(t.num_actions for t in traces)
    input_ids = torch.full((R, N), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, N), dtype=torch.long)
    deleted_at = torch.full((R, N), INF_POS, dtype=torch.long)
    seg_start = torch.zeros((R, N), dtype=torch.long)
    row = torch.zeros(B, dtype=torch.long)
    state_index = torch.zeros((B, T + 1), dtype=torch.long)
    actions = torch.zeros((B, T), dtype=torch.long)
    action_mask = torch.zeros((B, T), dtype=torch.bool)
    bkspc_allowed = torch.zeros((B, T + 1), dtype=torch.bool)
    is_noise = torch.zeros((B, T), dtype=torch.bool)
    for r, members in enumerate(layout):
        off, last = 0, -1
        for b in sorted(members):  # input order inside a row: trace order
            tr, n, t = traces[b], lens[b], traces[b].num_actions
            sl = slice(off, off + n)
            input_ids[r, sl], position_ids[r, sl] = tr.input_ids, tr.position_ids
            deleted_at[r, sl] = torch.where(tr.deleted_at < INF_POS, tr.deleted_at + off, tr.deleted_at)
            seg_start[r, sl] = off
            row[b] = r
            state_index[b, : t + 1], bkspc_allowed[b, : t + 1] = tr.state_index + off, tr.bkspc_allowed
            actions[b, :t], action_mask[b, :t], is_noise[b, :t] = tr.actions, True, tr.is_noise
            off, last = off + n, int(tr.position_ids.max())
        # padding: its own segment; positions continue after the last trace's largest
        position_ids[r, off:] = torch.arange(N - off) + last + 1
        seg_start[r, off:] = off
    return {
        "input_ids": input_ids, "position_ids": position_ids, "deleted_at": deleted_at,
        "seg_start": seg_start, "row": row, "state_index": state_index, "actions": actions,
        "action_mask": action_mask, "bkspc_allowed": bkspc_allowed, "is_noise": is_noise,
    }  # fmt: skip
