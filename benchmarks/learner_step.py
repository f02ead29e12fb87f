"""(SequenceMatch learner step with a 5 % backspace rate) / (plain MLE step), same tokens and model.

Both steps are forward + backward on the same number of input positions: the SequenceMatch step runs
the single masked pass (`--attn`, default auto: FlexAttention on CUDA, on the CPU dense up to 512 inputs, split beyond) over traces with 5 % <bkspc>
actions and computes the chi^2-mixture objective (half data rows, half model rows); the MLE step is
HF's plain causal LM pass (flash SDPA on CUDA) with gamma^t-weighted cross-entropy. Medians of
`--repeats` timed steps after `--warmup` untimed ones. Last line: `sm_step_over_mle_step: X`.

    python benchmarks/learner_step.py                       # CPU, small Llama
    python benchmarks/learner_step.py --preset 1b --device cuda   # 1.1B Llama, bf16, B=4, L=2048
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from sm_dist.core.objective import ObjectiveParams
from sm_dist.core.traces import build_inputs
from sm_dist.learner.step import StepParams, loss_and_backward, mle_loss_and_backward

PRESETS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab, batch, seq_len)
    "cpu": (256, 4, 4, 4, 1024, 512, 8, 256),
    "cpu-long": (256, 4, 4, 2, 1024, 512, 2, 1024),  # GQA, long rows: where the dense mask's O(N^2) shows
    "1b": (2048, 22, 32, 4, 5632, 32000, 4, 2048),
}


def build_model(preset: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, n_layer, heads, kv, inter, vocab, _, seq = PRESETS[preset]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        num_hidden_layers=n_layer,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=seq,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.train()


def make_traces(n: int, seq_len: int, vocab: int, rate: float, seed: int):
    """n traces of exactly seq_len inputs (prompt 32 + actions), `rate` of the actions <bkspc>."""
    rng = random.Random(seed)
    bk, P = vocab - 1, 32
    traces = []
    for b in range(n):
        acts = [bk if rng.random() < rate else rng.randrange(vocab - 1) for _ in range(seq_len - P)]
        prompt = [rng.randrange(vocab - 1) for _ in range(P)]
        traces.append(build_inputs(prompt, acts, bk, from_data=b % 2 == 0))
    return traces, bk


def timed(fn, device: str, warmup: int, repeats: int) -> list[float]:
    out = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bkspc-rate", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attn", choices=["auto", "sdpa", "flex", "split"], default="auto")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model(args.preset, args.device, dtype)
    *_, vocab, batch, seq = PRESETS[args.preset]
    traces, bk = make_traces(batch, seq, vocab, args.bkspc_rate, seed=0)
    n_bk = sum(int((t.actions == bk).sum()) for t in traces)
    print(f"model {args.preset} on {args.device} ({dtype}), B={batch} L={seq}, {n_bk} <bkspc> actions")
    p = StepParams(
        objective=ObjectiveParams(bkspc_id=bk, divergence="chi2_mixture", chi2_weight=1e-3), attn=args.attn
    )
    ids = torch.stack([t.input_ids for t in traces]).to(args.device)

    def sm_step():
        loss_and_backward(model, traces, p, step=1)
        model.zero_grad(set_to_none=True)

    def mle_step():
        mle_loss_and_backward(model, ids, gamma=0.998)
        model.zero_grad(set_to_none=True)

    # interleave the two so that drift on a noisy machine hits both alike
    sm_t, mle_t = [], []
    for _ in range(2):
        mle_t += timed(mle_step, args.device, args.warmup, (args.repeats + 1) // 2)
        sm_t += timed(sm_step, args.device, args.warmup, (args.repeats + 1) // 2)
    sm, mle = statistics.median(sm_t), statistics.median(mle_t)
    tokens = batch * seq
    print(f"MLE step median {mle * 1e3:.1f} ms ({tokens / mle:,.0f} tokens/s) over {len(mle_t)} runs")
    print(f"SM  step median {sm * 1e3:.1f} ms ({tokens / sm:,.0f} tokens/s) over {len(sm_t)} runs")
    print(f"sm_step_over_mle_step: {sm / mle:.3f}")


if __name__ == "__main__":
    main()
