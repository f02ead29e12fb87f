"""The mask-equivalence check (DESIGN §2) as plain functions, shared by the pytest test and by
`benchmarks/gpu_equivalence.py` (which runs on a GPU machine without pytest, Ray or vLLM).

Masked: one batched pass over each trace's single-pass layout. Reference: separate plain causal passes
over every collapsed state. Both read the logits of the state's last token.
"""

from __future__ import annotations

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

Trace = tuple[list[int], list[int]]


def tiny_models(vocab: int, hidden: int, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Llama, Qwen2 (4 heads, 2 KV heads) and GPT-2 (4 heads), 2 layers each, in eval mode."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )
    models = {
        "llama": LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)),
        "gpt2": GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=256)
        ),
    }
    return {k: m.eval() for k, m in models.items()}


def random_traces(n: int, seed: int, bkspc: int, max_prompt: int = 8, max_steps: int = 30) -> list[Trace]:
    """Random lengths, backspace rates 0-50 %, backspaces at the prompt boundary (every 5th trace),
    runs of 2-4 consecutive backspaces; token ids are `0 .. bkspc-1`."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        prompt = [rng.randrange(bkspc) for _ in range(rng.randint(1, max_prompt))]
        rate = rng.uniform(0.0, 0.5)
        acts: list[int] = []
        if k % 5 == 0:  # backspaces right at the prompt boundary
            acts += [bkspc] * rng.randint(1, 3)
        for _ in range(rng.randint(0, max_steps)):
            if rng.random() < rate:
                acts += [bkspc] * (rng.randint(2, 4) if rng.random() < 0.2 else 1)  # runs of backspaces
            else:
                acts.append(rng.randrange(bkspc))
        out.append((prompt, acts))
    return out


def states_of(trace: Trace, bkspc: int) -> list[tuple[int, ...]]:
    """The collapsed states s_0 .. s_T of a trace."""
    p, a = trace
    return [tuple(collapse(p + a[:t], bkspc, prompt_len=len(p))) for t in range(len(a) + 1)]


@torch.no_grad()
def separate_pass_logits(model, states: list[tuple[int, ...]], chunk: int = 64) -> list[torch.Tensor]:
    """Plain causal passes, right-padded (the last real position of each row sees exactly its own
    state): fp32 logits of each state's last token, one HF call per `chunk` states."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(states), chunk):
        part = states[i : i + chunk]
        n = max(map(len, part))
        ids = torch.tensor([list(s) + [0] * (n - len(s)) for s in part], device=dev)
        logits = model(ids, use_cache=False).logits.float()
        out += [logits[j, len(s) - 1] for j, s in enumerate(part)]
    return out


@torch.no_grad()
def max_state_diff(
    model,
    traces: list[Trace],
    bkspc: int,
    attn: str,
    cache: dict | None = None,
    chunk: int = 50,
    pack: bool = False,
):
    """(worst max-abs diff, largest |reference logit|, states checked) over every state of every
    trace. `cache` keeps reference logits per state across calls (e.g. the SDPA and Flex runs).
    `pack`: the masked pass packs several traces a row (each its own segment)."""
    cache = {} if cache is None else cache
    todo = sorted({s for tr in traces for s in states_of(tr, bkspc)} - cache.keys(), key=len)
    cache.update(zip(todo, separate_pass_logits(model, todo)))
    inputs = [build_inputs(p, a, bkspc) for p, a in traces]
    worst, scale, checked = 0.0, 0.0, 0
    for i in range(0, len(traces), chunk):  # one masked pass per chunk of traces
        outs = forward_traces(model, inputs[i : i + chunk], attn=attn, pack=pack)
        for tr, layout, logits in zip(traces[i : i + chunk], inputs[i : i + chunk], outs):
            for t, state in enumerate(states_of(tr, bkspc)):
                ref = cache[state]
                worst = max(worst, (logits[int(layout.state_index[t])] - ref).abs().max().item())
                scale, checked = max(scale, ref.abs().max().item()), checked + 1
    return worst, scale, checked


def grad_rel_diff(model, traces: list[Trace], bkspc: int, attn: str, ref_attn: str = "sdpa", seed: int = 0):
    """Worst over parameters of max|g_attn - g_ref| / max|g_ref|, the parameter gradients of one loss
    over the logits of a batched masked pass (a fixed random weighting of the log-softmax), through
    `attn` and through `ref_attn`. Returns (worst, number of parameters compared)."""
    inputs = [build_inputs(p, a, bkspc) for p, a in traces]
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    V = model.get_output_embeddings().weight.shape[0]
    weights = [torch.randn(len(t.input_ids), V, generator=gen).to(dev) for t in inputs]

    def grads(backend: str) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logits = forward_traces(model, inputs, attn=backend)
        sum((lg.log_softmax(-1) * w).sum() for lg, w in zip(logits, weights)).backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, got = grads(ref_attn), grads(attn)
    model.zero_grad(set_to_none=True)
    if ref.keys() != got.keys():
        raise AssertionError(f"{attn} and {ref_attn} reach different parameters")
    worst = max(((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-6)).item() for n in ref)
    return worst, len(ref)
