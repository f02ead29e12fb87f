"""The math of sm-dist, pure torch (no Ray, vLLM or pydantic): traces, masks, forward, objective."""

from sm_dist.core.forward import forward_traces, masked_logits
from sm_dist.core.masks import dense_mask, flex_block_mask
from sm_dist.core.objective import (
    DIVERGENCES,
    ObjectiveParams,
    bc_loss,
    sequence_match_loss,
    training_loss,
    transitions,
)
from sm_dist.core.traces import TraceBatch, TraceInputs, augment_noise, build_inputs, collapse, collate
from sm_dist.core.vocab import BKSPC_TOKEN, BkspcError, add_bkspc, check_model_has_bkspc, get_bkspc_id

__all__ = [
    "BKSPC_TOKEN",
    "DIVERGENCES",
    "BkspcError",
    "ObjectiveParams",
    "TraceBatch",
    "TraceInputs",
    "add_bkspc",
    "augment_noise",
    "bc_loss",
    "build_inputs",
    "check_model_has_bkspc",
    "collapse",
    "collate",
    "dense_mask",
    "flex_block_mask",
    "forward_traces",
    "get_bkspc_id",
    "masked_logits",
    "sequence_match_loss",
    "training_loss",
    "transitions",
]
