"""Tiny models built locally from a config, with a locally trained tokenizer (no hub anywhere).

`make_tiny_model` writes a folder that both transformers and vLLM's CPU build load: a Llama-style
model whose head size vLLM's CPU attention accepts (32 or 64), and a byte-level BPE tokenizer trained
with `tokenizers` on the given text (or on the arithmetic task's fixed alphabet, which gives one token
per character), with `<pad>`, `<bos>`, `<eos>`, `<unk>` and `<bkspc>` as special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from sm_dist.core.vocab import BKSPC_TOKEN, add_bkspc

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # <bkspc> is added to the model by add_bkspc
# Every character of the DeepMind add_or_sub_in_base questions and answers (bases 2..16).
ARITH_ALPHABET = "0123456789abcdef +-?,.InbasewhtiWI"
TINY_POSITIONS = 512  # max_position_embeddings of a tiny model built at start (model.tiny)
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def train_tokenizer(
    texts: Iterable[str] | None, vocab_size: int = 512, alphabet: str | None = None, with_bkspc: bool = True
):
    """Train a byte-level BPE tokenizer; with `alphabet` and no texts it is character-level.

    `with_bkspc` adds `<bkspc>` as a special token (tokenizer only; a model gets it via add_bkspc)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=texts is not None)
    tok.decoder = decoders.ByteLevel()
    if texts is None:
        if not alphabet:
            raise ValueError("train_tokenizer needs texts or an alphabet")
        # One pass over the alphabet, vocab capped at alphabet + specials: no merges, one token per char.
        chars = sorted(set(alphabet))
        vocab_size = len(chars) + len(SPECIALS)
        texts = ["".join(chars)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet is None else [],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    if with_bkspc:
        fast.add_special_tokens({"additional_special_tokens": [BKSPC_TOKEN]})
    return fast


def check_head_size(hidden_size: int, num_heads: int) -> None:
    """ValueError unless hidden_size / num_heads is a head size vLLM's CPU attention supports."""
    head_dim, rem = divmod(hidden_size, num_heads)
    if rem or head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"hidden_size={hidden_size} / num_heads={num_heads} gives head size {hidden_size / num_heads}; "
            f"vLLM's CPU attention needs one of {VLLM_CPU_HEAD_SIZES} (e.g. hidden 128 with 2 heads)"
        )


def make_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    alphabet: str | None = ARITH_ALPHABET,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = TINY_POSITIONS,
    seed: int = 0,
) -> Path:
    """Build and save a tiny Llama-style model + tokenizer to `out_dir`; return the path.

    head size = hidden_size / num_heads must be one vLLM's CPU build supports (32, 64, ...).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    check_head_size(hidden_size, num_heads)
    tok = train_tokenizer(
        texts, vocab_size=vocab_size, alphabet=None if texts is not None else alphabet, with_bkspc=False
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    add_bkspc(model, tok)  # the same path as for any HF model: <bkspc> last, its head row made rare
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out
