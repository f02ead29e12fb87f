"""`sm-dist export RUN_DIR OUT`: a run's newest checkpoint as one plain HF folder (loadable by
transformers and vLLM, no PEFT needed), in the run's `model.dtype` unless told otherwise.

A LoRA checkpoint's `model/` is an adapter folder naming its base (`sm_dist.learner.lora`): the base
loads, PEFT applies the adapter and merges it (`merge_and_unload`, PEFT's own merge: an independent check
of the merged weights the learner syncs), and the merged model is written. A full-model checkpoint's
`model/` is copied through transformers (cast to the dtype asked for).
"""

from __future__ import annotations

from pathlib import Path

from sm_dist.errors import CheckpointError, UserError


def find_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of `run_dir` (or `run_dir` itself when it is a checkpoint)."""
    from sm_dist.learner import checkpoint as ckpt

    d = Path(run_dir)
    if (d / "model" / "config.json").is_file() and (d / "learner_state.json").is_file():
        return d
    if not d.is_dir():
        raise UserError(
            str(d), "does not exist.", "pass a run directory (run.run_dir) or one of its checkpoints"
        )
    last = ckpt.latest_checkpoint(d)
    if last is None:
        raise CheckpointError(
            str(d), "holds no checkpoint (checkpoints/step-N/).", "train until a checkpoint is written"
        )
    return last


def _run_dtype(ckpt_dir: Path) -> str:
    """`model.dtype` of the run that wrote the checkpoint (its config.yaml), else float32."""
    import yaml

    for cfg in (ckpt_dir.parent.parent / "config.yaml",):
        if cfg.is_file():
            return (yaml.safe_load(cfg.read_text()) or {}).get("model", {}).get("dtype", "float32")
    return "float32"


def export(run_dir: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Write the merged HF folder of `run_dir`'s newest checkpoint to `out`; returns the checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sm_dist.learner import lora

    ckpt_dir = find_checkpoint(run_dir)
    model_dir = ckpt_dir / "model"
    dt = getattr(torch, dtype or _run_dtype(ckpt_dir))
    if lora.is_adapter_dir(model_dir):
        base = lora.base_dir(model_dir)
        if not (Path(base) / "config.json").is_file():
            raise CheckpointError(
                str(model_dir), f"is a LoRA adapter whose base model {base} is gone.",
                f"put the base model back at {base} (or edit base_model_name_or_path in adapter_config.json)",
            )  # fmt: skip
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(dt).save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(out))
    return ckpt_dir
