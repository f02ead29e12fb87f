"""Peak memory (and step time) of the SequenceMatch learner step against the plain HF MLE step.

A small Llama with Llama-3's 128k vocabulary (hidden 256, 2 layers), B rows of L inputs, on the CPU.
Each case runs in a fresh subprocess (so one case's allocations never count against another) that builds
the model, runs `--steps` forward + backward steps and reports its high-water mark (`VmHWM` of
/proc/self/status, the peak resident set) and the median step time:

  mle          HF's own MLE step: `model(input_ids, labels=input_ids).loss.backward()` (full logits)
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

VOCAB, HIDDEN, LAYERS, HEADS, INTER = 128_256, 256, 2, 4, 1024
CASES = ("mle", "sm_chunked", "sm_full")


def _rss_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(case: str, seq_len: int, batch: int, steps: int, chunk: int) -> dict:
    """One case in this (fresh) process: build, step, measure."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from learner_step import make_traces  # noqa: E402

    from sm_dist.core.objective import ObjectiveParams
    from sm_dist.learner.step import StepParams, loss_and_backward

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, intermediate_size=INTER, max_position_embeddings=seq_len,
                      attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(cfg).train()
    traces, bk = make_traces(batch, seq_len, VOCAB, 0.05, seed=0)
    ids = torch.stack([t.input_ids for t in traces])
    p = StepParams(
        ObjectiveParams(bkspc_id=bk), loss_chunk_size=chunk if case == "sm_chunked" else 0, pack=True
    )

    def step():
        if case == "mle":
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        else:
            loss_and_backward(model, traces, p, step=1)
        model.zero_grad(set_to_none=True)

    base = _rss_kib("VmRSS")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"peak_kib": _rss_kib("VmHWM"), "base_kib": base, "step_s": statistics.median(times)}


def run_case(case: str, seq_len: int, batch: int, steps: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--lengths", str(seq_len), "--batch", str(batch),
           "--steps", str(steps), "--chunk", str(chunk)]  # fmt: skip
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
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.lengths[0], args.batch, args.steps, args.chunk)))
        return
    print(f"Llama hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB:,}, B={args.batch}, CPU fp32; "
          f"{args.steps} steps per case, each case a fresh process (VmHWM)")  # fmt: skip
    print(
        "| L | MLE step (s) | SM step, chunked (s) | SM step, full logits (s) | MLE peak (MiB) "
        "| SM peak, chunked (MiB) | SM peak, full logits (MiB) | SM chunked / MLE peak | SM full / MLE peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ratio = full_ratio = float("nan")
    for L in args.lengths:
        r = {c: run_case(c, L, args.batch, args.steps, args.chunk) for c in CASES}
        mib = {c: r[c]["peak_kib"] / 1024 for c in CASES}
        ratio, full_ratio = mib["sm_chunked"] / mib["mle"], mib["sm_full"] / mib["mle"]
        print(f"| {L} | {r['mle']['step_s']:.2f} | {r['sm_chunked']['step_s']:.2f} | {r['sm_full']['step_s']:.2f} "
              f"| {mib['mle']:,.0f} | {mib['sm_chunked']:,.0f} | {mib['sm_full']:,.0f} | {ratio:.3f} | {full_ratio:.3f} |")  # fmt: skip
        above = {c: (r[c]["peak_kib"] - r[c]["base_kib"]) / 1024 for c in CASES}
        print(
            f"  L={L} peak above the built model: " + ", ".join(f"{c} {v:,.0f} MiB" for c, v in above.items())
        )
    print(f"sm_full_peak_over_mle_peak: {full_ratio:.3f}")
    print(f"sm_peak_over_mle_peak: {ratio:.3f}")


if __name__ == "__main__":
    main()
