"""Open-ended text metrics on hand-computable inputs, and perplexity against a direct computation."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sm_dist.eval.text_metrics import distinct_n, ngram_entropy, perplexity, repetition_rate, text_metrics


def test_diversity_and_repetition_by_hand():
    loop, varied = [1, 2, 1, 2, 1, 2], [1, 2, 3, 4, 5, 6]
    assert distinct_n([varied], 1) == 1.0 and distinct_n([loop], 1) == 2 / 6
    assert distinct_n([loop], 2) == 2 / 5  # (1,2) and (2,1) among 5 bigrams
    assert repetition_rate([varied]) == 0.0 and repetition_rate([loop]) == 4 / 6
    assert math.isclose(ngram_entropy([varied], 1), math.log(6))
    assert ngram_entropy([[7, 7, 7]], 1) == 0.0


def test_perplexity_matches_direct_nll():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=2)).eval()  # fmt: skip
    samples = [[1, 5, 7, 3], [2, 9], [4, 4, 4, 4, 4, 1]]
    nll = n = 0
    with torch.no_grad():
        for s in samples:
            logp = model(torch.tensor([s])).logits[0, :-1].log_softmax(-1)
            nll -= float(logp.gather(-1, torch.tensor(s[1:])[:, None]).sum())
            n += len(s) - 1
    assert math.isclose(perplexity(model, samples, batch_size=2), math.exp(nll / n), rel_tol=1e-5)
    m = text_metrics(samples, model)
    assert {"distinct_1", "distinct_2", "entropy_3", "repetition", "perplexity"} <= m.keys()
    with pytest.raises(ValueError, match=">= 2 tokens"):
        perplexity(model, [[1]])


def test_cli_text_metrics(tiny_model_dir, tmp_path, capsys):
    import json

    from sm_dist.cli import main

    data = tmp_path / "samples.jsonl"
    data.write_text(
        '{"text": "In base 7, what is 25 + -3?"}\n{"text": ""}\n{"text": "In base 2, what is 1 + 1?"}\n'
    )
    with pytest.raises(SystemExit) as e:
        main(["text-metrics", "--model", str(tiny_model_dir), "--data", str(data), "--field", "text",
              "--on-bad", "skip", "--out", str(tmp_path / "m.json")])  # fmt: skip
    assert e.value.code == 0
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["n_samples"] == 2 and out["skipped"] == {"empty": 1} and out["perplexity"] > 1
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :]) == out
