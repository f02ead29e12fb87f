"""The LoRA and QLoRA learner step (issue 21's GPU check), with torch + transformers + peft only (what the
lent GPU machine has; bitsandbytes for QLoRA where its wheel was carried).

A Llama (`--preset`, the sizes of benchmarks/learner_step.py) is saved to a folder and loaded the way a
learner rank loads it (`sm_dist.learner.lora`): LoRA on every linear layer (`--r`, `--alpha`) and the
`<bkspc>` rows through PEFT's `trainable_token_indices`; for QLoRA the base in 4 bits (NF4, double
quantisation, bf16 compute, `lora.quantization_config`) and peft's `prepare_model_for_kbit_training`.
Each step is the SequenceMatch loss (chi^2 mixture, 5 % <bkspc> actions, half data rows) + backward +
AdamW over the trainable tensors. Checked, not only timed: the loss is finite, only adapter tensors and
the `<bkspc>` rows change, and the merged weights (`lora.merged_stream`, what a sync sends) are in
`--dtype`. Prints the seconds per step (median), trainable and total parameters, peak GPU memory, and
last `qlora_over_lora_step: X` (or `lora_step_s: X` without bitsandbytes or CUDA).

    python benchmarks/lora_step.py --preset 1b --device cuda          # on the GPU machine
    python benchmarks/lora_step.py --preset cpu --device cpu --dtype float32 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from learner_step import PRESETS, build_model, make_traces  # this folder (run as a script)

from sm_dist.core.objective import ObjectiveParams
from sm_dist.learner import lora
from sm_dist.learner.step import StepParams, loss_and_backward


def load(folder: str, device: str, dtype: torch.dtype, four_bit: bool, r: int, alpha: float, bk: int):
    """The model as a learner rank holds it: LoRA (+ the <bkspc> rows) over the base, 4-bit for QLoRA."""
    from transformers import AutoModelForCausalLM

    if four_bit:
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=lora.quantization_config(dtype), dtype=dtype, device_map={"": device}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    settings = SimpleNamespace(r=r, alpha=alpha, dropout=0.0, target_modules="all-linear",
                               bkspc_rows="trainable_tokens")  # fmt: skip
    return lora.apply_lora(model, settings, bk).train()


def run(model, traces, p: StepParams, steps: int, device: str) -> dict:
    """`steps` AdamW steps; checks that only trainable tensors change and the loss stays finite."""
    before = {n: t.detach().float().cpu().clone() for n, t in model.named_parameters()}
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=1e-3)
    secs, loss = [], float("nan")
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_and_backward(model, traces, p, step=1)["loss/total"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
    changed = {n for n, t in model.named_parameters() if not torch.equal(t.detach().float().cpu(), before[n])}
    trainable = {n for n, t in model.named_parameters() if t.requires_grad}
    assert torch.isfinite(torch.tensor(loss)), f"loss {loss}"
    assert changed and changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    return {"step_s": statistics.median(secs[1:] or secs), "loss": loss, "changed": len(changed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    *_, vocab, batch, seq = PRESETS[args.preset]
    bk = vocab - 1
    folder = tempfile.mkdtemp(prefix="smdist-lora-step-")
    build_model(args.preset, "cpu", torch.float32).save_pretrained(folder)
    traces, _ = make_traces(batch, seq, vocab, 0.05, seed=0)
    p = StepParams(ObjectiveParams(bkspc_id=bk, divergence="chi2_mixture", chi2_weight=1e-3),
                   attn="auto", loss_chunk_size=512, pack=True)  # fmt: skip
    kinds = ["lora"]
    try:
        import bitsandbytes  # noqa: F401 -- QLoRA's 4-bit layers

        kinds += ["qlora"] if args.device == "cuda" else []
    except ImportError:
        print("qlora: skipped (bitsandbytes is not installed)", flush=True)
    got = {}
    for kind in kinds:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = load(folder, args.device, dtype, kind == "qlora", args.r, args.alpha, bk)
        trainable, total = lora.param_counts(model)
        got[kind] = run(model, traces, p, args.steps, args.device)
        merged = lora.merged_stream(model, lora.live_state_dict(model), dtype)
        assert all(s.dtype == dtype for s in merged.specs if s.dtype.is_floating_point), "merged dtype"
        name = merged.specs[0].name
        assert merged.read(name).dtype == dtype
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
        print(f"{kind}: {trainable:,} trainable of {total:,} parameters, loss {got[kind]['loss']:.4f}, "
              f"{got[kind]['changed']} tensors changed (all trainable), merged weights in {args.dtype}",
              flush=True)  # fmt: skip
        print(f"{kind}_step_s: {got[kind]['step_s']:.4f}", flush=True)
        print(f"{kind}_peak_gib: {peak:.2f}", flush=True)
        del model
    if "qlora" in got:
        print(f"qlora_over_lora_step: {got['qlora']['step_s'] / got['lora']['step_s']:.3f}")
    else:
        print(f"lora_step_s: {got['lora']['step_s']:.4f}")


if __name__ == "__main__":
    main()
