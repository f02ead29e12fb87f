"""Tiny Qwen2 and GPT-2 models built from transformers configs (no hub), for the learner and end-to-end
tests of other architectures than the tiny Llama (`sm_dist.core.tiny`). Head size 64 (vLLM's CPU
attention accepts it), 2 layers.

    tok = gpt2_style_tokenizer(texts)                 # byte-level BPE, <|endoftext|> only: no BOS added
    tok = train_tokenizer(texts, with_bkspc=False)    # sm_dist.core.tiny's: <pad> <bos> <eos> <unk>
    build_model("qwen2", tok, out)                    # a model of len(tok) rows + the tokenizer, in `out`

`<bkspc>` is not added here: the end-to-end tests give it with `sm-dist add-bkspc`; a tokenizer that
already has it (the tiny Llama's) gives a model that has its row.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("qwen2", "gpt2")
EOT = "<|endoftext|>"  # GPT-2's one special token: bos = eos = unk, and encode adds none of them


def gpt2_style_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `texts` the GPT-2 way: `<|endoftext|>` is bos, eos and unk,
    there is no pad token, and nothing is added on encode (no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def model_config(
    arch: str, vocab: int, tok, hidden: int = 128, layers: int = 2, positions: int = 256, dropout: float = 0.1
):
    """The transformers config of a tiny `arch` (2 heads of 64; Qwen2 with 1 KV head: grouped-query
    attention and q/k/v biases, untied head, no dropout; GPT-2 with its head tied to the embedding and
    `dropout` on embeddings, residuals and attention, 0.1 as GPT-2's own; a test that compares steps
    across ranks needs 0: each rank draws its own dropout masks)."""
    from transformers import GPT2Config, Qwen2Config

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=hidden // 64, num_key_value_heads=1, max_position_embeddings=positions,
            tie_word_embeddings=False, pad_token_id=tok.pad_token_id, **ids,
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=hidden // 64, n_positions=positions,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **ids,
        )  # fmt: skip
    raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")


def build_model(arch: str, tok, out: str | Path, seed: int = 0, **kw) -> Path:
    """A randomly initialised tiny `arch` with `len(tok)` vocabulary rows, saved to `out` with `tok`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, len(tok), tok, **kw), dtype=torch.float32)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out
