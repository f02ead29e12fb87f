"""The weight-transport interface (DESIGN §4): one thin base class, one local implementation each side.

Ordering rules, as a usage loop (learner rank 0):

    transport = ObjectStoreTransport(workers=[w0, w1], timeout_s=120)
    for step in range(num_steps):
        learner.step()
        if step % sync_every == 0:
            version += 1
            transport.publish(version, model.state_dict())   # returns once every worker runs `version`

A worker applies an update between generate calls, never inside one (`RolloutWorker.update_weights`),
tags every rollout with the version it ran, and `publish` raises a `WeightSyncError` naming the worker,
the version and the timeout when one does not confirm in time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch


class WeightSyncError(TimeoutError):
    """A weight sync step did not finish in time, or a worker reported the wrong version."""


class WeightTransport(ABC):
    """Moves `(version, weights)` from the learner to every rollout worker."""

    @abstractmethod
    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Learner side: send `state_dict` (HF checkpoint names) as `version`; block until every
        worker confirms it, raising `WeightSyncError` on timeout. Returns `sync/...` metrics."""

    @abstractmethod
    def receive(self, engine: Any, payload: Any, version: int, worker_id: str) -> int:
        """Worker side: turn `payload` (what `publish` sent) into weights loaded by `engine`; return
        the version now loaded."""
