"""The learner's LR schedule: linear warmup, then cosine to the floor at total_steps, or constant."""

from __future__ import annotations

import math

import pytest

from sm_dist.config import LearnerConfig
from sm_dist.learner.step import lr_factor


def test_warmup_then_cosine_to_the_floor():
    p = LearnerConfig(lr_warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, p, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, p, 104) == pytest.approx(1.0)
    assert lr_factor(54, p, 104) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(104, p, 104) == pytest.approx(0.1) and lr_factor(500, p, 104) == pytest.approx(0.1)


def test_constant_schedule_needs_no_end_and_cosine_does():
    const = LearnerConfig(lr_warmup_steps=2, schedule="constant")
    assert [lr_factor(s, const, None) for s in (0, 1, 2, 10**6)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(5, LearnerConfig(lr_warmup_steps=2, schedule="cosine"), None)
