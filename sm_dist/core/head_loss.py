"""The LM head and what the objective reads of it, over chunks of positions, never the full logits.

The objective (DESIGN §1) reads two numbers per state of a sequence: V(s_t) = logsumexp of the logits
(with `<bkspc>` excluded at the prompt boundary) and the chosen action's logit l(a_t|s_t). Today's path
materialises fp32 logits [B, N, V] for every input position (4 GiB at B = 4, L = 2048, V = 128k, plus
their gradient). Here the model body runs once; the LM head runs on the hidden states of the S
positions the objective reads (the states, not the prompt or the padding), `chunk` rows at a time, and
keeps in fp32 only `lse` [S] and `q` [S]. Backward recomputes each chunk's logits (one more head matmul
per chunk, as prime-rl's `fused_lm_head_token_chunk_size` and SkyRL's chunked log-probs do):

    d lse / d logits = softmax(logits)   (0 on an excluded <bkspc> column),   d q / d logits = onehot(a)

so grad_logits = g_lse * p + g_q * onehot(a) [chunk, V], then grad_h = grad_logits @ W and
grad_W += grad_logits^T @ h. Peak extra memory: a few [chunk, V] fp32 buffers.

The head runs inside the model's forward (a pre-hook on the output embedding captures its input and
a forward hook replaces its output by the scores), so FSDP2 and DDP see the scores as the model's
output: parameters are unsharded, and gradients reduced, exactly as for the logits path.
Supported heads: a plain `nn.Linear` (weight [V, H], optional bias), used as-is by the model (Llama,
Qwen2, GPT-2 ...). `masked_scores` refuses any other head, or a model that post-processes its logits
(softcapping, logit scale), naming the fix (`learner.loss_chunk_size=0`); the learner's step falls back to
full logits for them by itself (a PEFT-wrapped head under LoRA: its delta rows live in the wrapper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 512  # positions per chunk: [512, 128k] fp32 is 256 MiB, [512, 32k] 64 MiB


@dataclass
class HeadTargets:
    """Which positions the head runs on and what is read there (all on the model's device).

    flat_index: [S] long, index into the model's [R * N] flattened positions.
    actions: [S] long, the action whose logit is read at each position (any id where none is needed).
    exclude: [S] bool, the `excluded_id` column is left out of logsumexp there (prompt boundary).
    """

    flat_index: torch.Tensor
    actions: torch.Tensor
    exclude: torch.Tensor
    excluded_id: int


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    dev = weight.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def _excluded_rows(exclude: torch.Tensor) -> list[int]:
    """The rows whose excluded column is left out (one host sync per call: a handful of states)."""
    return exclude.nonzero()[:, 0].tolist()


def _rows_in(rows: list[int], i: int, j: int, device) -> torch.Tensor:
    return torch.tensor([r - i for r in rows if i <= r < j], dtype=torch.long, device=device)


class _ChunkedHeadScores(torch.autograd.Function):
    """(h [S, H], W [V, H], bias [V] | None) -> (lse [S], q [S]) fp32, chunk by chunk (module docstring).

    No [chunk, V] copy for the excluded column: logsumexp runs over the whole chunk, and only the few
    excluded rows are recomputed without it (as `scores_from_logits` does); in backward their softmax
    column is zeroed, since their lse never contained it."""

    @staticmethod
    def forward(ctx, h, weight, bias, actions, exclude, excluded_id: int, chunk: int, dt: torch.dtype):
        S = h.shape[0]
        lse = torch.empty(S, dtype=torch.float32, device=h.device)
        q = torch.empty(S, dtype=torch.float32, device=h.device)
        ex = _excluded_rows(exclude)
        with torch.autocast(h.device.type, enabled=False):
            w, b = weight.to(dt), (bias.to(dt) if bias is not None else None)
            for i in range(0, S, chunk):
                j = min(S, i + chunk)
                logits = F.linear(h[i:j].to(dt), w, b).float()  # [c, V]
                q[i:j] = logits.gather(1, actions[i:j, None])[:, 0]  # a boundary <bkspc> reads its
                lse[i:j] = torch.logsumexp(logits, dim=-1)  # logit (weight 0, but finite)
                rows = _rows_in(ex, i, j, h.device)
                if rows.numel():
                    sub = logits[rows]  # [k, V], a copy
                    sub[:, excluded_id] = float("-inf")
                    lse[i + rows] = torch.logsumexp(sub, dim=-1)
                del logits
        ctx.save_for_backward(h, weight, bias, actions, lse)
        ctx.excluded_id, ctx.chunk, ctx.dt, ctx.ex = excluded_id, chunk, dt, ex
        return lse, q

    @staticmethod
    def backward(ctx, g_lse, g_q):
        h, weight, bias, actions, lse = ctx.saved_tensors
        dt, chunk = ctx.dt, ctx.chunk
        S = h.shape[0]
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        with torch.autocast(h.device.type, enabled=False):
            w, b = weight.to(dt), (bias.to(dt) if bias is not None else None)
            for i in range(0, S, chunk):
                j = min(S, i + chunk)
                hc = h[i:j].to(dt)
                g = F.linear(hc, w, b).float()  # the chunk's logits again, turned into their gradient:
                g.sub_(lse[i:j, None]).exp_()  # softmax (of the lse's own support)
                rows = _rows_in(ctx.ex, i, j, h.device)
                if rows.numel():
                    g[rows, ctx.excluded_id] = 0.0  # not in the excluded rows' lse
                g.mul_(g_lse[i:j, None]).scatter_add_(1, actions[i:j, None], g_q[i:j, None])  # + onehot(a)
                g = g.to(dt)
                if grad_h is not None:
                    grad_h[i:j] = (g @ w).to(h.dtype)
                if dt == torch.float32:  # fp32 accumulation over chunks, in place when possible
                    grad_w.addmm_(g.t(), hc)
                else:
                    grad_w.add_((g.t() @ hc).float())
                if bias is not None:
                    grad_b.add_(g.float().sum(0))
                del g
        gw = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        gb = grad_b.to(bias.dtype) if (bias is not None and ctx.needs_input_grad[2]) else None
        return grad_h, gw, gb, None, None, None, None, None


def chunked_head_scores(
    h: torch.Tensor, head: torch.nn.Module, t: HeadTargets, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [S, H] (hidden states at the target positions) -> (lse [S], q [S]) fp32, exact against
    `logsumexp` / `gather` over `head(h).float()` (module docstring)."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    weight, bias = head.weight, getattr(head, "bias", None)
    return _ChunkedHeadScores.apply(
        h, weight, bias, t.actions, t.exclude, t.excluded_id, chunk, _compute_dtype(weight)
    )


def plain_head(model) -> torch.nn.Module | None:
    """The model's output embedding if the chunked path computes exactly what the model would: a plain
    `nn.Linear` (not wrapped: PEFT's LoRA / trainable-token / modules-to-save wrappers add to the weight in
    their own forward) and no post-processing of the logits; else None."""
    head = model.get_output_embeddings()
    cfg = model.config
    post = [
        k
        for k in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
        if getattr(cfg, k, None)
    ]
    if not isinstance(head, torch.nn.Linear) or post:
        return None
    if any(c.__module__.split(".")[0] == "peft" for c in type(head).__mro__):
        return None
    return head


def check_plain_head(model) -> torch.nn.Module:
    """`plain_head(model)`, or ValueError naming why the chunked path cannot stand in for the head."""
    head = plain_head(model)
    if head is None:
        out = model.get_output_embeddings()
        raise ValueError(
            f"the chunked loss needs a plain nn.Linear LM head whose output the model returns unchanged; "
            f"{type(model).__name__} has head {type(out).__name__} (softcapping/logit scale: "
            f"{getattr(model.config, 'final_logit_softcapping', None)}/{getattr(model.config, 'logit_scale', None)}). "
            "Fix: set learner.loss_chunk_size=0 (full logits)"
        )
    return head


def forward_head_scores(model, call, targets: HeadTargets, chunk: int = DEFAULT_CHUNK):
    """Run `call()` (the model's forward, however it is invoked) with the LM head replaced by the
    chunked scores of `targets`; returns (lse [S], q [S]) fp32, read from the output's `.logits`."""
    head = check_plain_head(model)
    box: dict[str, torch.Tensor] = {}

    def capture(_module, args):
        box["h"] = args[0]  # [R, N, H], input order (split attention's un-permute hook runs first)
        return (args[0][:, :0], *args[1:])  # the real head runs on no positions

    def replace(_module, _args, _out):
        h = box.pop("h")
        flat = h.reshape(-1, h.shape[-1]).index_select(0, targets.flat_index)
        lse, q = chunked_head_scores(flat, head, targets, chunk)
        return torch.stack([lse, q], dim=-1)  # [S, 2]: what the model returns as `logits`

    hooks = [head.register_forward_pre_hook(capture), head.register_forward_hook(replace)]
    try:
        out = call()
    finally:
        for hk in hooks:
            hk.remove()
    scores = out.logits
    if scores.dim() != 2 or scores.shape != (targets.flat_index.numel(), 2):
        raise ValueError(
            f"{type(model).__name__} changed its LM head's output (got {tuple(scores.shape)}, expected "
            f"({targets.flat_index.numel()}, 2)). Fix: set learner.loss_chunk_size=0 (full logits)"
        )
    return scores[:, 0], scores[:, 1]
