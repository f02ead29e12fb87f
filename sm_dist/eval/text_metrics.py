"""Open-ended text metrics (issue: evaluation): diversity and repetition of generated text, and its
perplexity under a model. Pure functions over token-id lists, plus one HF perplexity pass.

distinct-n      unique n-grams / all n-grams, pooled over the samples (Li et al. 2016)
repetition      fraction of tokens that repeat a token among the previous `window` tokens of the same
                sample (a local-loop detector: degenerate samples score near 1)
ngram_entropy   Shannon entropy (nats) of the pooled n-gram distribution
perplexity      exp(total NLL / total predicted tokens) of the samples under a causal LM
MAUVE is not included (it needs a feature model; none is bundled here).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

Ids = Sequence[int]


def _ngrams(ids: Ids, n: int):
    return (tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))


def distinct_n(samples: Sequence[Ids], n: int) -> float:
    grams = [g for s in samples for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(samples: Sequence[Ids], window: int = 16) -> float:
    hits = total = 0
    for s in samples:
        for i, t in enumerate(s):
            hits += t in s[max(0, i - window) : i]
            total += 1
    return hits / total if total else 0.0


def ngram_entropy(samples: Sequence[Ids], n: int) -> float:
    counts = Counter(g for s in samples for g in _ngrams(s, n))
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def perplexity(model, samples: Sequence[Ids], batch_size: int = 16) -> float:
    """exp(mean NLL per predicted token) of `samples` (each >= 2 tokens) under `model`."""
    import torch

    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    rows = [list(s) for s in samples if len(s) >= 2]
    if not rows:
        raise ValueError("perplexity needs at least one sample of >= 2 tokens")
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            part = rows[i : i + batch_size]
            n = max(map(len, part))
            ids = torch.tensor([r + [0] * (n - len(r)) for r in part], device=dev)
            mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in part], device=dev)
            logp = model(ids, use_cache=False).logits.float().log_softmax(-1)[:, :-1]
            tok = logp.gather(-1, ids[:, 1:, None])[..., 0]
            m = mask[:, 1:].float()
            nll -= float((tok * m).sum())
            count += int(m.sum())
    return math.exp(nll / count)


def text_metrics(samples: Sequence[Ids], model=None, ns: Sequence[int] = (1, 2, 3)) -> dict[str, float]:
    out: dict[str, float] = {
        "n_samples": float(len(samples)),
        "mean_len": sum(map(len, samples)) / max(1, len(samples)),
    }
    for n in ns:
        out[f"distinct_{n}"] = distinct_n(samples, n)
        out[f"entropy_{n}"] = ngram_entropy(samples, n)
    out["repetition"] = repetition_rate(samples)
    if model is not None:
        out["perplexity"] = perplexity(model, samples)
    return out
