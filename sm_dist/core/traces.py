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
