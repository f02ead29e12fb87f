"""The `<bkspc>` token: adding it to a tokenizer and a model, and finding it again (DESIGN §2).

`<bkspc>` is added as a special token and the embedding and LM head are resized *before* the first
rollout, so vLLM's vocabulary never changes during a run. Its LM-head row starts at the mean row
minus a margin along the mean hidden direction, so the untrained model rarely samples it.
"""

from __future__ import annotations

from pathlib import Path

import torch

BKSPC_TOKEN = "<bkspc>"


class BkspcError(ValueError):
    """The tokenizer or model has no usable `<bkspc>` token."""


def get_bkspc_id(tokenizer) -> int:
    """Return the id of `<bkspc>` in `tokenizer`, or raise a `BkspcError` that says how to add it."""
    vocab = tokenizer.get_vocab()
    if BKSPC_TOKEN not in vocab:
        raise BkspcError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no {BKSPC_TOKEN!r} token "
            f"(vocab size {len(vocab)}). Add it first: `sm-dist add-bkspc MODEL_DIR OUT_DIR`, or "
            "sm_dist.core.add_bkspc(model, tokenizer)."
        )
    bid = int(vocab[BKSPC_TOKEN])
    if BKSPC_TOKEN not in tokenizer.all_special_tokens:
        raise BkspcError(
            f"{BKSPC_TOKEN!r} (id {bid}) is an ordinary token of this tokenizer, not a special token: text "
            "could produce it. Re-add it as a special token with sm_dist.core.add_bkspc."
        )
    # A real piece of text must never tokenise to the backspace id.
    probe = tokenizer.encode(BKSPC_TOKEN, add_special_tokens=False)
    if probe != [bid]:
        raise BkspcError(f"{BKSPC_TOKEN!r} does not encode to its own id {bid} (got {probe}); re-add it.")
    return bid


def check_model_has_bkspc(model, bkspc_id: int) -> None:
    """Raise if the model's output layer has no row for `bkspc_id`."""
    n_out = model.get_output_embeddings().weight.shape[0]
    if bkspc_id >= n_out:
        raise BkspcError(
            f"model's LM head has {n_out} rows but <bkspc> has id {bkspc_id}: the model was not resized "
            "for the token. Use sm_dist.core.add_bkspc(model, tokenizer) or `sm-dist add-bkspc`."
        )


@torch.no_grad()
def add_bkspc(model, tokenizer, margin: float = 4.0) -> int:
    """Add `<bkspc>` to `tokenizer` and `model` in place; return its id. Idempotent.

    The new LM-head row is `mean_row - margin * |row| * h_mean / |h_mean|`, with `h_mean` the mean
    final hidden state over a probe of the vocabulary: on typical states its logit sits about
    `margin * |row| * |h_mean|` below the average token's, so it is rarely sampled before training.
    """
    vocab = tokenizer.get_vocab()
    if BKSPC_TOKEN in vocab and vocab[BKSPC_TOKEN] < model.get_output_embeddings().weight.shape[0]:
        return get_bkspc_id(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [BKSPC_TOKEN]})
    bid = get_bkspc_id(tokenizer)
    old_rows = model.get_output_embeddings().weight.shape[0]
    h_mean = _mean_hidden(model, old_rows)
    if bid >= old_rows:
        model.resize_token_embeddings(bid + 1, mean_resizing=False)
    if getattr(model.config, "vocab_size", None) is not None:
        model.config.vocab_size = model.get_output_embeddings().weight.shape[0]
    emb_in = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head.weight.data_ptr() != emb_in.data_ptr():
        emb_in[bid] = emb_in[:old_rows].mean(0)  # never read: <bkspc> is never an input (DESIGN §2)
    # LM-head row (shared with the input row when tied, which is harmless for the same reason).
    rows = head.weight[:old_rows].float()
    u = h_mean / h_mean.norm().clamp_min(1e-6)
    head.weight[bid] = (rows.mean(0) - margin * rows.norm(dim=1).mean() * u).to(head.weight.dtype)
    if getattr(head, "bias", None) is not None:
        head.bias[bid] = head.bias[:old_rows].mean() - margin
    return bid


def _mean_hidden(model, n_vocab: int, n_probe: int = 64) -> torch.Tensor:
    """Mean final hidden state (the LM head's input) over a sequence of evenly spaced token ids."""
    dev = model.get_output_embeddings().weight.device
    ids = torch.linspace(0, n_vocab - 1, min(n_probe, n_vocab), device=dev).long()[None]
    captured = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    return captured[0].float().reshape(-1, captured[0].shape[-1]).mean(0)


def add_bkspc_to_dir(model_dir: str | Path, out_dir: str | Path) -> int:
    """Load an HF model folder, add `<bkspc>`, save to `out_dir` (loadable by transformers and vLLM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"model dir {str(model_dir)!r} has no config.json; pass an HF model folder")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    bid = add_bkspc(model, tok)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return bid
