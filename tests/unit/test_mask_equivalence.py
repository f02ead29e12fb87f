"""The mandatory equivalence test (DESIGN §2): one masked pass == separate passes per collapsed state.

For >= 200 random traces per model (random lengths, backspace rates 0-50 %, backspaces at the prompt
boundary, runs of consecutive backspaces), for Llama, Qwen2 and GPT-2 tiny models, through both the
dense SDPA mask and the FlexAttention BlockMask: fp32 max abs diff <= 1e-5.
"""

import random

import pytest
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

V, BK = 48, 47
N_TRACES = 200


def _models():
    torch.manual_seed(0)
    common = dict(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=128
    )
    return {
        "llama": LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    }


def random_traces(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        prompt = [rng.randrange(BK) for _ in range(rng.randint(1, 8))]
        rate = rng.uniform(0.0, 0.5)
        acts: list[int] = []
        if k % 5 == 0:  # backspaces right at the prompt boundary
            acts += [BK] * rng.randint(1, 3)
        for _ in range(rng.randint(0, 30)):
            if rng.random() < rate:
                acts += [BK] * (rng.randint(2, 4) if rng.random() < 0.2 else 1)  # runs of backspaces
            else:
                acts.append(rng.randrange(BK))
        out.append((prompt, acts))
    return out


def _reference(model, states: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Separate (unmasked, plain causal) passes over each state: right-padded, so the last real
    position of each row sees exactly its own state; one HF call per 64 states."""
    out = []
    for i in range(0, len(states), 64):
        chunk = states[i : i + 64]
        n = max(map(len, chunk))
        ids = torch.tensor([list(s) + [0] * (n - len(s)) for s in chunk])
        logits = model(ids, use_cache=False).logits.float()
        out += [logits[j, len(s) - 1] for j, s in enumerate(chunk)]
    return out


@pytest.fixture(scope="module")
def models():
    ms = _models()
    for m in ms.values():
        m.eval()
    return ms


@pytest.fixture(scope="module")
def ref_cache():
    """Reference logits per (arch, collapsed state), shared by the SDPA and FlexAttention runs."""
    return {"llama": {}, "qwen2": {}, "gpt2": {}}


@pytest.mark.parametrize("attn", ["sdpa", "flex"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@torch.no_grad()
def test_single_pass_equals_separate_passes(models, ref_cache, arch, attn):
    model = models[arch]
    traces = random_traces(N_TRACES, seed=sum(map(ord, arch)))
    assert sum(BK in a for _, a in traces) > N_TRACES // 2
    inputs = [build_inputs(p, a, BK) for p, a in traces]
    cache: dict[tuple[int, ...], torch.Tensor] = ref_cache[arch]
    states = {tuple(collapse(p + a[:t], BK, prompt_len=len(p))) for p, a in traces for t in range(len(a) + 1)}
    todo = sorted(states - cache.keys(), key=len)
    cache.update(zip(todo, _reference(model, todo)))
    worst, checked = 0.0, 0
    for chunk in range(0, N_TRACES, 50):  # batches of 50 traces, each one masked pass
        outs = forward_traces(model, inputs[chunk : chunk + 50], attn=attn)
        for (p, a), tr, logits in zip(traces[chunk : chunk + 50], inputs[chunk : chunk + 50], outs):
            for t in range(len(a) + 1):
                state = tuple(collapse(p + a[:t], BK, prompt_len=len(p)))
                diff = (logits[int(tr.state_index[t])] - cache[state]).abs().max().item()
                worst, checked = max(worst, diff), checked + 1
    assert checked > 2000
    assert worst <= 1e-5, f"{arch}/{attn}: max abs diff {worst:.2e} over {checked} states"


@torch.no_grad()
def test_plain_causal_path_matches_hf(models):
    model = models["llama"]
    tr = build_inputs([1, 2, 3], [4, 5, 6], BK)
    (logits,) = forward_traces(model, [tr])
    ref = model(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits[0].float()
    assert torch.allclose(logits, ref, atol=1e-6)


def test_out_of_vocab_is_named(models):
    tr = build_inputs([1, 2], [3, V + 5], BK)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        forward_traces(models["llama"], [tr])
