"""(SequenceMatch learner step with a 5 % backspace rate) / (plain MLE step), same tokens and model.

Both steps are forward + backward on the same number of input positions: the SequenceMatch step runs
the single masked pass (`--attn`, default auto: FlexAttention on CUDA, on the CPU dense up to 512 inputs, split beyond) over traces with 5 % <bkspc>
actions and computes the chi^2-mixture objective (half data rows, half model rows); the MLE step is
HF's plain causal LM pass (flash SDPA on CUDA) with gamma^t-weighted cross-entropy; both run the LM
head and their loss over chunks of positions (`--chunk`, the learner's `loss_chunk_size`; the anchors
give their MLE step the same treatment: prime-rl's fused_lm_head_token_chunk_size, SkyRL's chunked
log-probs). Medians of `--repeats` timed steps after `--warmup` untimed ones. Last line:
`sm_step_over_mle_step: X`.

`--preset arith`: real arithmetic traces instead (the bundled train split, character tokenizer,
7.5 % noise + <bkspc>, half data rows and half model rows, B=64): the SequenceMatch step packed
(several traces a row) against padded (one a row), counting only real tokens. Last line
`packed_over_padded_tokens: X` (real tokens/s packed over padded).

    python benchmarks/learner_step.py                       # CPU, small Llama
    python benchmarks/learner_step.py --preset arith        # packed vs padded on arithmetic traces
    python benchmarks/learner_step.py --preset 1b --device cuda   # 1.1B Llama, bf16, B=4, L=2048
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from sm_dist.core.objective import ObjectiveParams
from sm_dist.core.traces import build_inputs
from sm_dist.learner.step import StepParams, loss_and_backward, mle_loss_and_backward

PRESETS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab, batch, seq_len)
    "cpu": (256, 4, 4, 4, 1024, 512, 8, 256),
    "cpu-long": (256, 4, 4, 2, 1024, 512, 2, 1024),  # GQA, long rows: where the dense mask's O(N^2) shows
    "1b": (2048, 22, 32, 4, 5632, 32000, 4, 2048),
    "arith": (256, 4, 4, 4, 1024, 0, 64, 128),  # vocab from the tokenizer; traces of their own lengths
}
ARITH_DATA = Path(__file__).resolve().parents[1] / "configs/data/arith/add_or_sub_in_base.train-easy.jsonl"


def build_model(preset: str, device: str, dtype: torch.dtype, vocab: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, n_layer, heads, kv, inter, v0, _, seq = PRESETS[preset]
    vocab = vocab or v0
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


def arith_traces(n: int, p_noise: float, seed: int):
    """n real arithmetic traces (bundled train split): <bos> prompt, answer + <eos> with `p_noise`
    noise tokens + <bkspc>; even ones are data rows, odd ones stand in for model rows."""
    from sm_dist.core.tiny import ARITH_ALPHABET, train_tokenizer
    from sm_dist.core.traces import augment_noise
    from sm_dist.core.vocab import get_bkspc_id

    tok = train_tokenizer(None, alphabet=ARITH_ALPHABET, with_bkspc=True)
    bk = get_bkspc_id(tok)
    noise_ids = [tok.convert_tokens_to_ids(c) for c in "0123456789abcdef"]
    rng = random.Random(seed)
    lines = ARITH_DATA.read_text().splitlines()
    traces = []
    for b, line in enumerate(rng.sample(lines, n)):
        row = json.loads(line)
        prompt = [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
        target = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        acts, noise = augment_noise(target, bk, p_noise, noise_ids, rng)
        traces.append(
            build_inputs(prompt, acts, bk, eos_id=tok.eos_token_id, is_noise=noise, from_data=b % 2 == 0)
        )
    return traces, bk, len(tok)


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
    ap.add_argument("--chunk", type=int, default=512, help="LM-head chunk of both steps (0: full logits)")
    ap.add_argument("--noise", type=float, default=0.075, help="arith: noise rate of the traces")
    ap.add_argument(
        "--pack-length", type=int, default=0, help="arith: inputs per packed row (0: learner default)"
    )
    args = ap.parse_args()
    if args.preset == "arith":
        return arith_main(args)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model(args.preset, args.device, dtype)
    *_, vocab, batch, seq = PRESETS[args.preset]
    traces, bk = make_traces(batch, seq, vocab, args.bkspc_rate, seed=0)
    n_bk = sum(int((t.actions == bk).sum()) for t in traces)
    print(f"model {args.preset} on {args.device} ({dtype}), B={batch} L={seq}, {n_bk} <bkspc> actions")
    p = StepParams(
        objective=ObjectiveParams(bkspc_id=bk, divergence="chi2_mixture", chi2_weight=1e-3),
        attn=args.attn,
        loss_chunk_size=args.chunk,
        pack=True,
    )
    ids = torch.stack([t.input_ids for t in traces]).to(args.device)

    def sm_step():
        loss_and_backward(model, traces, p, step=1)
        model.zero_grad(set_to_none=True)

    def mle_step():
        mle_loss_and_backward(model, ids, gamma=0.998, chunk=args.chunk)
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


def arith_main(args) -> None:
    torch.manual_seed(0)
    traces, bk, vocab = arith_traces(PRESETS["arith"][6], args.noise, seed=0)
    model = build_model("arith", args.device, torch.float32, vocab=vocab)
    obj = ObjectiveParams(bkspc_id=bk, divergence="chi2_mixture", chi2_weight=1e-3)
    kw = dict(attn=args.attn, loss_chunk_size=args.chunk, pack_length=args.pack_length)
    steps = {pack: StepParams(obj, pack=pack, **kw) for pack in (False, True)}
    shape, t = {}, {False: [], True: []}

    def run(pack: bool):
        m = loss_and_backward(model, traces, steps[pack], step=1)
        shape[pack] = (m["perf/rows"], m["perf/padded_tokens"], m["perf/tokens"])
        model.zero_grad(set_to_none=True)

    for i in range(args.warmup + args.repeats):  # one step of each in turn: drift hits both alike
        for pack in (False, True):
            dt = timed(lambda pack=pack: run(pack), args.device, 0, 1)[0]
            if i >= args.warmup:
                t[pack].append(dt)
    real = shape[True][2]
    lens = sorted(int(tr.input_ids.numel()) for tr in traces)
    print(f"{len(traces)} arithmetic traces, {real:.0f} real inputs (lengths {lens[0]}..{lens[-1]}, median "
          f"{lens[len(lens) // 2]}), {sum(int((tr.actions == bk).sum()) for tr in traces)} <bkspc> actions, "
          f"attn={args.attn}, pack_length={args.pack_length}")  # fmt: skip
    for pack, name in ((False, "padded"), (True, "packed")):
        med = statistics.median(t[pack])
        rows, padded, _ = shape[pack]
        print(f"{name}: {rows:.0f} rows, {padded:.0f} inputs ({real / padded:.0%} real); step median "
              f"{med * 1e3:.1f} ms over {len(t[pack])} runs, {real / med:,.0f} real tokens/s")  # fmt: skip
    print(f"packed_over_padded_tokens: {statistics.median(t[False]) / statistics.median(t[True]):.3f}")


if __name__ == "__main__":
    main()
