"""Checks of what a user passes, run before anything expensive starts (Ray, vLLM, a learner).

Each check raises a `sm_dist.errors.UserError` naming the input, the problem and the fix, so a bad
model folder, data file or checkpoint costs seconds, not a vLLM start-up:

* `check_model_dir`: an HF folder with config.json, a loadable tokenizer that has `<bkspc>`, a vocab
  that covers it, and safetensors weights whose headers match their file sizes.

Imports no Ray or vLLM; transformers only inside `check_model_dir`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sm_dist.errors import ModelError

log = logging.getLogger("sm_dist.validate")

_ADD_BKSPC = "sm-dist add-bkspc BASE_MODEL_DIR OUT_DIR builds a usable folder from any HF causal LM"


def check_model_dir(path: str | Path, what: str = "model.dir"):
    """Check the model folder `path` (passed as `what`: a config key or a flag); return its tokenizer."""
    d = Path(path)
    if not d.is_dir():
        problem = "is a file, not a model folder" if d.exists() else "does not exist"
        raise ModelError(
            what, f"{d} {problem}.", f"point {what} at an HF model folder with <bkspc> ({_ADD_BKSPC})"
        )
    try:
        config = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise ModelError(what, f"{d} has no config.json: not an HF model folder.", _ADD_BKSPC) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(what, f"{d}/config.json is not valid JSON ({e}).", "restore the file") from None
    _check_weights(d, what)
    tok = _load_tokenizer(d, what)
    from sm_dist.core.vocab import BkspcError, get_bkspc_id

    try:
        bid = get_bkspc_id(tok)
    except BkspcError as e:
        raise ModelError(
            what, f"{d}: {e}", f"sm-dist add-bkspc {d} {d}-bkspc, then use that folder"
        ) from None
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if isinstance(vocab, int) and bid >= vocab:
        raise ModelError(
            what,
            f"{d}: <bkspc> has id {bid} but config.json has vocab_size={vocab}: the model was not resized for it.",
            f"sm-dist add-bkspc {d} {d}-bkspc (resizes the embeddings and the head)",
        )
    return tok


def _check_weights(d: Path, what: str) -> None:
    from sm_dist.learner.checkpoint import safetensors_problem

    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        if any(d.glob("*.bin")):
            raise ModelError(
                what,
                f"{d} has PyTorch .bin weights, not safetensors.",
                _ADD_BKSPC + " (it saves safetensors)",
            )
        raise ModelError(what, f"{d} has no *.safetensors weights.", "copy the weights in, or " + _ADD_BKSPC)
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(what, f"{index} is unreadable ({e}).", "restore the file") from None
        missing = sorted(s for s in shards if not (d / s).is_file())
        if missing:
            raise ModelError(
                what, f"{d} lacks the weight shards {missing} named in its index.", "copy them in"
            )
    for w in weights:
        if problem := safetensors_problem(w):
            raise ModelError(
                what, f"{d}: {problem}.", "restore the weights file (copy it again, or re-save the model)"
            )


def _load_tokenizer(d: Path, what: str):
    from transformers import AutoTokenizer

    try:  # deliberate: any failure here is a property of the user's folder, reported as such
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())[:300]
        raise ModelError(
            what,
            f"{d} has no loadable tokenizer ({type(e).__name__}: {msg}).",
            "copy the base model's tokenizer files (tokenizer.json, tokenizer_config.json) into it",
        ) from None
