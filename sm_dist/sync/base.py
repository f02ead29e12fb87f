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
from collections.abc import Mapping, Sequence
from typing import Any

import torch


class WeightSyncError(TimeoutError):
    """A weight sync step did not finish in time, or a worker reported the wrong version."""


def wait_all(futures: Sequence[Any], names: Sequence[str], timeout_s: float, what: str) -> list:
    """`ray.get` of one future per worker, after waiting at most `timeout_s` for all of them; a
    `WeightSyncError` names the workers that did not answer and `what` they were doing."""
    import ray

    ready, not_ready = ray.wait(list(futures), num_returns=len(futures), timeout=timeout_s)
    if not_ready:
        late = [names[futures.index(f)] for f in not_ready]
        raise WeightSyncError(
            f"{what} timed out after {timeout_s}s: {late} did not confirm ({len(ready)}/{len(futures)} did)"
        )
    return ray.get(list(futures))


def confirm_version(name: str, got: int, version: int) -> None:
    """A worker's answer to a sync must be the version it was sent."""
    if got != version:
        raise WeightSyncError(f"{name} reports version {got} after a sync of version {version}")


def confirm_versions(names: Sequence[str], got: Sequence[int], version: int) -> None:
    """Every worker's answer to a sync must be the version it was sent."""
    for name, v in zip(names, got, strict=True):
        confirm_version(name, v, version)


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
