"""Peak memory (and step time) of the SequenceMatch learner step against the plain HF MLE step.

A small Llama with Llama-3's 128k vocabulary (hidden 256, 2 layers), B rows of L inputs, on the CPU.
Each case runs in a fresh subprocess (so one case's allocations never count against another) that builds
the model, runs `--steps` forward + backward steps and reports its high-water mark (`VmHWM` of
/proc/self/status, the peak resident set) and the median step time:

  mle          HF's own MLE step: `model(input_ids, labels=input_ids).loss.backward()` (full logits)
  mle_chunked  the MLE step with the chunked head (`mle_loss_and_backward(chunk=...)`; not by default)
  sm_chunked   `loss_and_backward` with the chunked loss (`loss_chunk_size`, the default) and packing
  sm_full      the same with `loss_chunk_size=0`: today's path before issue 22 (full fp32 logits)

The SequenceMatch traces have 5 % `<bkspc>` actions, half data rows and half model rows, prompt 32.
Ratios are of whole-process peaks (the model, its gradients and the interpreter count in both); the
peaks above the process's resident size after the model is built are printed too.

    python benchmarks/learner_memory.py                          # L = 1024, last line sm_peak_over_mle_peak
    python benchmarks/learner_memory.py --lengths 256 512 1024 2048   # the docs/learner_scaling.md table
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {  # name: (vocab, hidden, layers, heads, kv_heads, intermediate)
    "small128k": (128_256, 256, 2, 4, 4, 1024),
    "1b": (32_000, 2048, 22, 32, 4, 5632),  # TinyLlama-1.1B's shape (the GPU check)
}
CASES = ("mle", "mle_chunked", "sm_chunked", "sm_full")
DEFAULT_CASES = ("mle", "sm_chunked", "sm_full")


def _rss_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(case: str, seq_len: int, batch: int, steps: int, chunk: int, model_name: str, device: str) -> dict:
    """One case in this (fresh) process: build, step, measure (CUDA: bf16 weights, peak allocated)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from learner_step import make_traces  # noqa: E402

    from sm_dist.core.objective import ObjectiveParams
    from sm_dist.learner.step import StepParams, loss_and_backward, mle_loss_and_backward

    torch.manual_seed(0)
    vocab, hidden, layers, heads, kv, inter = MODELS[model_name]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=seq_len,
                      attn_implementation="sdpa")  # fmt: skip
    cuda = device == "cuda"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32).train()
    traces, bk = make_traces(batch, seq_len, vocab, 0.05, seed=0)
    ids = torch.stack([t.input_ids for t in traces]).to(device)
    p = StepParams(
        ObjectiveParams(bkspc_id=bk), loss_chunk_size=chunk if case == "sm_chunked" else 0, pack=True
    )

    def step():
        if case == "mle":
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        elif case == "mle_chunked":
            mle_loss_and_backward(model, ids, chunk=chunk)
        else:
            loss_and_backward(model, traces, p, step=1)
        model.zero_grad(set_to_none=True)

    base = torch.cuda.memory_allocated() // 1024 if cuda else _rss_kib("VmRSS")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() // 1024 if cuda else _rss_kib("VmHWM")
    return {"peak_kib": peak, "base_kib": base, "step_s": statistics.median(times[1:] or times)}


def run_case(case: str, seq_len: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--lengths", str(seq_len), "--batch", str(args.batch),
           "--steps", str(args.steps), "--chunk", str(args.chunk), "--model", args.model, "--device", args.device]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"case {case} L={seq_len} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="steps per case (median time; peak over all)")
    ap.add_argument("--chunk", type=int, default=512, help="loss_chunk_size of the chunked case")
    ap.add_argument("--model", choices=sorted(MODELS), default="small128k")
    ap.add_argument("--device", default="cpu", help="cpu (peak: VmHWM) or cuda (bf16; peak allocated)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES))
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        r = child(args.child, args.lengths[0], args.batch, args.steps, args.chunk, args.model, args.device)
        print(json.dumps(r))
        return
    vocab, hidden, layers, *_ = MODELS[args.model]
    where = "CUDA bf16 (peak: max_memory_allocated)" if args.device == "cuda" else "CPU fp32 (peak: VmHWM)"
    print(f"Llama {args.model}: hidden {hidden}, {layers} layers, vocab {vocab:,}, B={args.batch}, {where}; "
          f"{args.steps} steps per case (time: median after the first), each case a fresh process")  # fmt: skip
    cases = [c for c in CASES if c in args.cases]
    ratios = [(c, "mle") for c in ("sm_chunked", "sm_full") if c in cases and "mle" in cases]
    ratios += [("sm_chunked", "mle_chunked")] if {"sm_chunked", "mle_chunked"} <= set(cases) else []
    print("| L | " + " | ".join(f"{c} step (s)" for c in cases) + " | " + " | ".join(f"{c} peak (MiB)" for c in cases)
          + "".join(f" | {a} / {b} peak" for a, b in ratios) + " |")  # fmt: skip
    print("|---" * (1 + 2 * len(cases) + len(ratios)) + "|")
    last: dict[str, float] = {}
    for L in args.lengths:
        r = {c: run_case(c, L, args) for c in cases}
        mib = {c: r[c]["peak_kib"] / 1024 for c in cases}
        last = {f"{a}_peak_over_{b}_peak": mib[a] / mib[b] for a, b in ratios}
        print(f"| {L} | " + " | ".join(f"{r[c]['step_s']:.2f}" for c in cases) + " | "
              + " | ".join(f"{mib[c]:,.0f}" for c in cases) + "".join(f" | {v:.3f}" for v in last.values()) + " |")  # fmt: skip
        above = {c: (r[c]["peak_kib"] - r[c]["base_kib"]) / 1024 for c in cases}
        print(
            f"  L={L} peak above the built model: " + ", ".join(f"{c} {v:,.0f} MiB" for c, v in above.items())
        )
    for k, v in last.items():
        if k != "sm_chunked_peak_over_mle_peak":
            print(f"{k.replace('sm_full', 'sm_full_logits')}: {v:.3f}")
    if "sm_chunked_peak_over_mle_peak" in last:
        print(f"sm_peak_over_mle_peak: {last['sm_chunked_peak_over_mle_peak']:.3f}")


if __name__ == "__main__":
    main()
