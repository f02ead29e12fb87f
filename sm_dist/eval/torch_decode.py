"""Backspace-aware decoding in plain torch + transformers (no vLLM): for machines without vLLM (the GPU
benchmark, benchmarks/arith_gpu.py) and as SequenceMatch's rollout sampler there.

The rules are `sm_dist.rollout.engine`'s (read its docstring; checked against it in
tests/integration/test_torch_decode.py): `<bkspc>` is masked where the continuation is empty (and
everywhere with `forbid_bkspc`), `bkspc_bias` is added where it is allowed; a `<bkspc>` pops the last
continuation token; one more `<bkspc>` than `max_backspaces` is discarded and ends the rollout
("action_cap"); `max_actions` actions end it ("length"); `<eos>` ends it ("eos"). Search
(`no_repeat_deleted`): a token deleted at a state (the continuation as a tuple) is never chosen
again there. Forced prefixes are the first actions. Temperature 0 is argmax over fp32 logits; else
softmax(l / T) with top-p, drawn from one `torch.Generator(seed)` per call (the draws differ from
vLLM's: sampled results agree in distribution, not sample by sample).

Each step runs the model on every live rollout's `prompt + continuation` (left-padded, no KV cache:
answers are a few dozen actions, so recomputing the prefix is cheap next to bookkeeping a cache
through deletions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DecodeParams:
    """The subset of `RolloutParams` this decoder implements (same meanings)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_actions: int = 24
    max_backspaces: int = 4
    samples_per_prompt: int = 1
    seed: int = 0
    forbid_bkspc: bool = False
    no_repeat_deleted: bool = False
    bkspc_bias: float = 0.0


def decode_params(decoding: str, samples: int = 1, seed: int = 0, temperature: float | None = None, **kw):
    """`DecodeParams` of one `sm-dist eval` decoding (sm_dist.eval.decoding), without vLLM."""
    if decoding not in ("search", "greedy", "greedy_no_bkspc", "sample"):
        raise ValueError(f"unknown decoding {decoding!r}")
    if decoding != "sample" and samples != 1:
        raise ValueError(f"--samples {samples} with the deterministic decoding {decoding}")
    t = (1.0 if temperature is None else temperature) if decoding == "sample" else 0.0
    return DecodeParams(temperature=t, samples_per_prompt=samples, seed=seed,
                        forbid_bkspc=decoding == "greedy_no_bkspc",
                        no_repeat_deleted=decoding == "search", **kw)  # fmt: skip


@dataclass
class TorchRollout:
    prompt_ids: list[int]
    action_ids: list[int] = field(default_factory=list)
    final_ids: list[int] = field(default_factory=list)  # the stack: collapsed continuation
    finish_reason: str = ""
    num_backspaces: int = 0
    prompt_index: int = 0
    sample_index: int = 0
    deleted: dict = field(default_factory=dict)  # state -> tokens deleted there (search)


def _next_logits(model, rows: list[TorchRollout], pad_id: int, device) -> torch.Tensor:
    """fp32 logits [n, V] of the next action of each rollout (left-padded batch)."""
    seqs = [r.prompt_ids + r.final_ids for r in rows]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = torch.tensor(s)
        mask[i, n - len(s) :] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos)
    return out.logits[:, -1].float()


def _choose(logits: torch.Tensor, p: DecodeParams, gen: torch.Generator) -> torch.Tensor:
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = (logits / p.temperature).softmax(-1)
    if p.top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < p.top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
    return torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(logits.device)


def _mask(logits: torch.Tensor, rows: list[TorchRollout], p: DecodeParams, bkspc_id: int) -> None:
    for i, r in enumerate(rows):
        if p.forbid_bkspc or not r.final_ids:
            logits[i, bkspc_id] = float("-inf")
        else:
            logits[i, bkspc_id] += p.bkspc_bias
        if p.no_repeat_deleted:
            for t in r.deleted.get(tuple(r.final_ids), ()):
                logits[i, t] = float("-inf")


def _act(r: TorchRollout, a: int, p: DecodeParams, bkspc_id: int, eos_id: int) -> None:
    """Apply one sampled action (module docstring); sets finish_reason when the rollout ends."""
    if a == bkspc_id:
        if r.num_backspaces == p.max_backspaces:
            r.finish_reason = "action_cap"  # the extra <bkspc> is discarded
            return
        r.action_ids.append(a)
        r.num_backspaces += 1
        t = r.final_ids.pop()
        r.deleted.setdefault(tuple(r.final_ids), set()).add(t)
    else:
        r.action_ids.append(a)
        r.final_ids.append(a)
        if a == eos_id:
            r.finish_reason = "eos"
    if not r.finish_reason and len(r.action_ids) >= p.max_actions:
        r.finish_reason = "length"


@torch.no_grad()
def torch_generate(
    model,
    prompts: Sequence[Sequence[int]],
    p: DecodeParams,
    bkspc_id: int,
    eos_id: int,
    prefixes: Sequence[Sequence[int]] | None = None,
    batch_size: int = 1024,
) -> list[TorchRollout]:
    """Rollouts of every prompt (`samples_per_prompt` each), ordered by (prompt, sample)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(p.seed)
    rolls = []
    for i, pr in enumerate(prompts):
        for k in range(p.samples_per_prompt):
            pre = [int(t) for t in prefixes[i]] if prefixes is not None else []
            r = TorchRollout([int(t) for t in pr], list(pre), list(pre), prompt_index=i, sample_index=k)
            if len(r.action_ids) >= p.max_actions:
                r.finish_reason = "length"
            rolls.append(r)
    was_training = model.training
    model.eval()
    while live := [r for r in rolls if not r.finish_reason]:
        for s in range(0, len(live), batch_size):
            chunk = live[s : s + batch_size]
            logits = _next_logits(model, chunk, eos_id, device)
            _mask(logits, chunk, p, bkspc_id)
            for r, a in zip(chunk, _choose(logits, p, gen).tolist()):
                _act(r, int(a), p, bkspc_id, eos_id)
    model.train(was_training)
    return rolls


def evaluate_torch(
    model,
    tok,
    examples,
    decoding: str = "search",
    samples: int = 1,
    seed: int = 0,
    force_error: bool = False,
    force_error_kind: str = "uniform",
    max_actions: int = 24,
    max_backspaces: int = 4,
    bkspc_bias: float = 0.0,
    temperature: float | None = None,
) -> dict:
    """`sm_dist.eval.arith_eval.evaluate` on (prompt, answer) examples with this decoder: the same
    metrics (summarize), the same forced prefixes, plus "examples" (per-sample results)."""
    from dataclasses import asdict

    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.eval.arith_eval import _encode, score_example, summarize
    from sm_dist.eval.decoding import forced_error_prefixes, plausible_error_prefixes

    p = decode_params(decoding, samples, seed, temperature, max_actions=max_actions,
                      max_backspaces=max_backspaces, bkspc_bias=bkspc_bias)  # fmt: skip
    prompt_ids, answer_ids = _encode(tok, examples)
    prefixes = None
    if force_error:
        prefixes = (
            plausible_error_prefixes(examples, answer_ids, tok, seed)
            if force_error_kind == "plausible"
            else forced_error_prefixes(answer_ids, seed)
        )
    bk, eos = get_bkspc_id(tok), int(tok.eos_token_id)
    results = []
    for ro in torch_generate(model, prompt_ids, p, bk, eos, prefixes):
        q = ro.prompt_index
        ex = examples[q]
        pred = tok.decode([t for t in ro.final_ids if t != eos], skip_special_tokens=True)
        r = score_example(
            ex.prompt, ex.answer, pred, ro.action_ids, bk, [*answer_ids[q], eos], ro.finish_reason
        )
        r.question_index, r.sample_index = q, ro.sample_index
        results.append(r)
    return summarize(results) | {"decoding": decoding, "samples": samples, "seed": seed,
                                 "forced_error": force_error, "examples": [asdict(r) for r in results]}  # fmt: skip
