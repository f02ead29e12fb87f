"""Replay buffer (DESIGN §3): the Arrow rollout schema, the FIFO, persisted `ReplayBuffer`, and its split
over `buffer.shards` actors (`ReplayShards`, sm_dist/buffer/shards.py)."""

from sm_dist.buffer.replay import ReplayBuffer, read_run_buffer
from sm_dist.buffer.schema import (
    SCHEMA,
    SCHEMA_VERSION,
    batch_to_rows,
    empty_batch,
    rows_to_batch,
    validate_batch,
)
from sm_dist.buffer.shards import ReplayShards

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "ReplayBuffer",
    "ReplayShards",
    "batch_to_rows",
    "empty_batch",
    "read_run_buffer",
    "rows_to_batch",
    "validate_batch",
]
