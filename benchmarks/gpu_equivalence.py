"""The mask-equivalence check on a GPU (no pytest, Ray or vLLM needed): for random traces, logits of
the single masked pass vs separate plain passes per collapsed state, for Llama, Qwen2 and GPT-2, via
the dense SDPA mask and the FlexAttention BlockMask, in fp32 and in bf16. Prints one line per case and,
last, `bf16_max_rel_diff: X` (worst |diff| / max|logit| over the bf16 cases; goal ~1e-2)."""

from __future__ import annotations

import argparse
import random

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sm_dist.core.forward import forward_traces
from sm_dist.core.traces import build_inputs, collapse

V, BK = 512, 511


def models(device):
    torch.manual_seed(0)
    c = dict(
        vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, max_position_embeddings=256
    )
    return {
        "llama": LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **c)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **c)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=256, n_layer=2, n_head=4, n_positions=256)),
    }


def traces(n, seed):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        p = [rng.randrange(BK) for _ in range(rng.randint(1, 16))]
        rate, a = rng.uniform(0, 0.5), [BK] * (k % 3)
        for _ in range(rng.randint(0, 150)):
            a += [BK] * rng.randint(1, 3) if rng.random() < rate else [rng.randrange(BK)]
        out.append((p, a))
    return out


@torch.no_grad()
def check(model, attn, dtype, device, n):
    model = model.to(device=device, dtype=dtype).eval()
    tr = traces(n, 1)
    ins = [build_inputs(p, a, BK) for p, a in tr]
    outs = forward_traces(model, ins, attn=attn)
    worst, scale = 0.0, 0.0
    for (p, a), t, lg in zip(tr, ins, outs):
        states = [collapse(p + a[:k], BK, prompt_len=len(p)) for k in range(len(a) + 1)]
        for k in range(0, len(states), 32):
            chunk = states[k : k + 32]
            L = max(map(len, chunk))
            ids = torch.tensor([s + [0] * (L - len(s)) for s in chunk], device=device)
            ref = model(ids, use_cache=False).logits.float()
            for j, s in enumerate(chunk):
                d = (lg[int(t.state_index[k + j])] - ref[j, len(s) - 1]).abs().max().item()
                worst, scale = max(worst, d), max(scale, ref[j, len(s) - 1].abs().max().item())
    return worst, worst / max(scale, 1e-6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--traces", type=int, default=200)
    args = ap.parse_args()
    worst_bf16 = 0.0
    for name, m in models(args.device).items():
        for dtype in (torch.float32, torch.bfloat16):
            for attn in ("sdpa", "flex"):
                d, rel = check(m, attn, dtype, args.device, args.traces)
                print(f"{name:6s} {attn:5s} {str(dtype):15s} max_abs {d:.2e} rel {rel:.2e}", flush=True)
                if dtype == torch.bfloat16:
                    worst_bf16 = max(worst_bf16, rel)
    print(f"bf16_max_rel_diff: {worst_bf16:.3e}")


if __name__ == "__main__":
    main()
