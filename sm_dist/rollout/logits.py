"""The vLLM v1 batch logits processor behind the backspace rules of `sm_dist.rollout.engine` (its module
docstring says why a logits processor, and not `logit_bias` / `bad_words`, enforces them)."""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

EXTRA_ARGS_KEY = "sm_bkspc"  # SamplingParams.extra_args key read by BkspcLogitsProcessor


class BkspcLogitsProcessor(LogitsProcessor):
    """vLLM v1 batch logits processor for `<bkspc>` (per-request spec in `extra_args["sm_bkspc"]`).

    Spec keys: `id` (the <bkspc> id), `boundary` (the request starts with an empty continuation:
    mask <bkspc> at its step 0), `forbid` (mask it at every step), `force` (request-relative steps
    at which only <bkspc> is allowed), `ban0` (token ids masked at step 0 only: the tokens already
    deleted at the request's start state, for `no_repeat_deleted`), `bias` (added to the <bkspc>
    logit where it is allowed, `bkspc_bias`). Requests without the key are
    untouched.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        # batch index -> (spec, live reference to the request's output token list)
        self.reqs: dict[int, tuple[dict, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # masking / forcing changes greedy choices

    @staticmethod
    def _new_state(params, _prompt_ids, output_ids):
        spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
        return None if spec is None else (spec, output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.reqs, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: [num_reqs, vocab] float32
        for i, (spec, out) in self.reqs.items():
            bid, step = spec["id"], len(out)
            if step == 0 and spec.get("ban0"):
                logits[i, spec["ban0"]] = float("-inf")
            if spec.get("forbid") or (step == 0 and spec.get("boundary")):
                logits[i, bid] = float("-inf")
            elif step in spec.get("force", ()):
                logits[i].fill_(float("-inf"))
                logits[i, bid] = 0.0
            elif spec.get("bias"):
                logits[i, bid] += spec["bias"]
        return logits
