"""The mask-equivalence check on a GPU (no pytest, Ray or vLLM needed): for random traces, logits of
the single masked pass vs separate plain passes per collapsed state, for Llama, Qwen2 and GPT-2, via
the dense SDPA mask, the FlexAttention BlockMask and the split path, in fp32 and in bf16 (the same
functions as tests/unit/test_mask_equivalence.py, larger models), then the parameter gradients of the
flex and split paths against the dense mask's; then packed rows (several traces a row) through the
three paths and the chunked loss (sm_dist.core.head_loss) against full logits, fp32. Prints one line
per case, `packed_fp32_max_abs_diff: X`, `chunked_loss_fp32_rel_diff: X` and, last,
`bf16_max_rel_diff: X` (worst |diff| / max|logit| over the bf16 cases; goal ~1e-2).

    PYTHONPATH=. python benchmarks/gpu_equivalence.py --traces 60
"""

from __future__ import annotations

import argparse

import torch

from tests.unit.equivalence import grad_rel_diff, max_state_diff, random_traces, tiny_models

V, BK = 512, 511


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--traces", type=int, default=200)
    args = ap.parse_args()
    traces = random_traces(args.traces, seed=1, bkspc=BK, max_prompt=16, max_steps=150)
    worst_bf16 = 0.0
    for name, model in tiny_models(V, hidden=256).items():
        for dtype in (torch.float32, torch.bfloat16):
            model = model.to(device=args.device, dtype=dtype)
            cache: dict = {}  # reference logits, shared by the two attention paths of one dtype
            for attn in ("sdpa", "flex", "split"):
                worst, scale, _ = max_state_diff(model, traces, BK, attn, cache=cache)
                rel = worst / max(scale, 1e-6)
                print(f"{name:6s} {attn:5s} {str(dtype):15s} max_abs {worst:.2e} rel {rel:.2e}", flush=True)
                if dtype == torch.bfloat16:
                    worst_bf16 = max(worst_bf16, rel)
            # the learner's backward through each path (FlexAttention has no CPU backward)
            for attn in ("flex", "split") if args.device != "cpu" else ("split",):
                g, n = grad_rel_diff(model, traces[:16], BK, attn)  # eval mode: no dropout noise
                print(
                    f"{name:6s} {attn:5s} {str(dtype):15s} grad rel diff vs sdpa {g:.2e} ({n} params)",
                    flush=True,
                )
    packed_and_chunked(args.device, traces)
    print(f"bf16_max_rel_diff: {worst_bf16:.3e}")


def packed_and_chunked(device: str, traces) -> None:
    """fp32 Llama: packed single passes vs separate passes, and the SequenceMatch loss through the
    chunked head vs full logits (the learner's path vs today's)."""
    from sm_dist.core.forward import masked_logits, masked_scores
    from sm_dist.core.objective import ObjectiveParams, sequence_match_loss
    from sm_dist.core.traces import build_inputs, collate

    model = tiny_models(V, hidden=256)["llama"].to(device)
    worst = 0.0
    for attn in ("sdpa", "flex", "split"):
        w, _, n = max_state_diff(model, traces, BK, attn, pack=True)
        print(f"llama  {attn:5s} packed fp32 max_abs {w:.2e} over {n} states", flush=True)
        worst = max(worst, w)
    print(f"packed_fp32_max_abs_diff: {worst:.3e}")
    batch = collate(
        [build_inputs(p, a, BK, from_data=i % 2 == 0) for i, (p, a) in enumerate(traces)], pack=True
    )
    p = ObjectiveParams(bkspc_id=BK)
    with torch.no_grad():
        full, _ = sequence_match_loss(masked_logits(model, batch, "flex"), batch, p)
        chunked, _ = sequence_match_loss(masked_scores(model, batch, BK, "flex", chunk=256), batch, p)
    print(f"chunked_loss_fp32_rel_diff: {abs(float(chunked - full)) / abs(float(full)):.3e}")


if __name__ == "__main__":
    main()
