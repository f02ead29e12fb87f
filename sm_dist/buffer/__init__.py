"""Replay buffer (DESIGN §3): the Arrow rollout schema and the FIFO, persisted `ReplayBuffer`."""

from sm_dist.buffer.replay import ReplayBuffer, read_run_buffer
from sm_dist.buffer.schema import (
    SCHEMA,
    SCHEMA_VERSION,
    batch_to_rows,
    empty_batch,
    rows_to_batch,
    validate_batch,
)

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "ReplayBuffer",
    "batch_to_rows",
    "empty_batch",
    "read_run_buffer",
    "rows_to_batch",
    "validate_batch",
]
