"""The learners' training state as a `torch.distributed.checkpoint` (DCP) folder, and reading it without
running anyone's code.

    save_state(module, optimizer, ckpt / "state")   # every rank at once: each writes its own shard
    load_state(module, optimizer, ckpt / "state")   # every rank at once: each reads what it holds

Each rank writes `__<rank>_0.distcp` with the parameters and AdamW moments it holds (its FSDP2 shard;
under DDP replicated tensors are written once, spread over the ranks), and the coordinator writes
`.metadata`, the index of which tensor slice lives where. Nothing is gathered on one rank. Tensors are
keyed by parameter name and global offsets, so a checkpoint loads onto any strategy (DDP, FSDP2, one
rank) and any number of ranks.

DCP itself reads `.metadata` with `pickle.load` and its non-tensor entries (the optimiser's param
groups) with `torch.load(weights_only=False)`: a checkpoint someone sent could run their code. Here
`.metadata` goes through an unpickler that only builds DCP's own metadata classes and a few torch and
builtin types (`read_metadata`), and non-tensor entries load with `weights_only=True`; anything else is
refused with `UnsafeCheckpoint`, before any of it runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

METADATA = ".metadata"

# the globals a DCP `.metadata` pickle names (torch 2.13): DCP's dataclasses, torch.Size and the
# dtype/layout/memory-format singletons (pickled by name), and plain containers
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"MetadataIndex"},
    "torch.distributed.checkpoint._extension": {"StreamTransformExtension", "ExtensionRegistry"},
    "torch": {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8",
              "bool", "strided", "contiguous_format", "preserve_format", "channels_last"},
    "torch.serialization": {"_get_layout"},  # a layout by its name ("torch.strided")
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "getattr"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}  # fmt: skip


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file names code to run (or types a checkpoint never holds): refused, not run."""


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            if (module, name) == ("builtins", "getattr"):
                return _torch_getattr
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"it names {module}.{name}, which a checkpoint never holds (refused, not run)")


def _torch_getattr(obj, name: str):
    """`getattr` as torch pickles its dtypes (getattr(torch, 'float32')): only torch attributes."""
    import torch

    if obj is not torch or not isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
        raise UnsafeCheckpoint(f"it calls getattr({obj!r}, {name!r}) (refused, not run)")
    return getattr(torch, name)


def read_metadata(path: str | Path):
    """The DCP `Metadata` of the folder `path` (or the `.metadata` file itself), restricted unpickling."""
    p = Path(path)
    p = p / METADATA if p.is_dir() else p
    with p.open("rb") as f:
        return _Restricted(f).load()


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise UnsafeCheckpoint("per-rank metadata files are not used by sm-dist")
            md = read_metadata(Path(self.path))
            md.storage_meta = md.storage_meta or StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(path))


def _planner(everything: bool = False):
    """DCP's load planner with non-tensor entries read by `torch.load(weights_only=True)`; with
    `everything`, the one that rebuilds the whole saved state without a template."""
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    class SafeLoadPlanner(_EmptyStateDictLoadPlanner if everything else DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)  # param-group numbers, never code
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def save_state(module, optimizer, path: str | Path) -> None:
    """Model + optimiser state under `path`, each rank its own shard (call on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_state(module, optimizer, path: str | Path) -> None:
    """Restore what `save_state` wrote (any strategy, any number of ranks; call on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    read_metadata(path)  # a crafted index is refused here, with its own error (DCP would wrap it)
    msd, osd = get_state_dict(module, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, storage_reader=_reader(Path(path)), planner=_planner())
    except CheckpointException as e:  # each rank's error, wrapped: a refused non-tensor entry
        if "Weights only load failed" in str(e) or "refused, not run" in str(e):
            raise UnsafeCheckpoint(
                f"a shard holds a pickled object: {' '.join(str(e).split())[-300:]}"
            ) from None
        raise
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_all(path: str | Path) -> dict:
    """Everything under `path` as nested dicts of full CPU tensors, with no model (one process; for
    inspection and tests): {"model": {name: tensor}, "optim": {"state": ..., "param_groups": ...}}."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}  # dcp.load would fill a copy: the planner rebuilds into the dict it is given
    _load_state_dict(sd, storage_reader=_reader(Path(path)), planner=_planner(everything=True), no_dist=True)
    return sd


def storage_problem(path: str | Path) -> str | None:
    """Why the DCP folder `path` cannot be read (its metadata refused or unreadable, a shard file it
    names missing or too short), or None."""
    d = Path(path)
    try:
        md = read_metadata(d)
    except UnsafeCheckpoint as e:
        return f"{d.name}/{METADATA}: {e}"
    except Exception as e:  # noqa: BLE001 -- a damaged pickle fails in many ways
        return f"{d.name}/{METADATA} is unreadable ({type(e).__name__}: {e})"
    ends: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = str(info.relative_path)
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(ends.items()):
        f = d / rel
        if not f.is_file():
            return f"{d.name}/{rel} is missing (named by {METADATA})"
        if f.stat().st_size < end:
            return f"{d.name}/{rel} has {f.stat().st_size} bytes, {METADATA} needs {end} (truncated?)"
    return None


def one_line(err: BaseException) -> str:
    """The message of `err` on one line, its type first."""
    return f"{type(err).__name__}: " + " ".join(str(err).split())


# ---- how the ranks hold the model (FSDP2 policies, activation checkpointing) ----------------------------


def fsdp_kwargs(cpu_offload: bool, param_dtype, on_cuda: bool) -> dict:
    """`fully_shard` keyword arguments: a MixedPrecisionPolicy when the weights train in a low precision
    (`param_dtype`, e.g. torch.bfloat16 when model.dtype is bfloat16: the unsharded parameters and the
    forward/backward in it, gradients reduce-scattered and accumulated in fp32, the sharded fp32 master
    weights stepped by the optimiser), and a CPUOffloadPolicy with `cpu_offload` (pinned host memory on
    CUDA). Plain values in, so it is testable without a process group."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    out: dict = {}
    if param_dtype is not None and param_dtype != torch.float32:
        out["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        out["offload_policy"] = CPUOffloadPolicy(pin_memory=on_cuda)
    return out


def decoder_layers(model) -> list:
    """The decoder blocks FSDP2 wraps one by one: the modules of `model` (an HF model; a PeftModel's base
    model) whose class the model names in `_no_split_modules`, as accelerate and torchtitan pick them
    (LlamaDecoderLayer, Qwen2DecoderLayer, GPT2Block, ...), outermost only. Empty when the model names
    none: then only the root is sharded (correct, but the whole model is gathered at once)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, object]] = []
    for path, module in model.named_modules():
        if type(module).__name__ in names and not any(path.startswith(f"{p}.") for p, _ in found):
            found.append((path, module))
    return [m for _, m in found]


def fully_shard_model(model, layers, **kwargs) -> None:
    """FSDP2 over each decoder block (`decoder_layers`), then the root (whose group holds what is left:
    embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def enable_activation_checkpointing(model) -> None:
    """HF gradient checkpointing of every decoder layer, non-reentrant (works under DDP and FSDP2, and
    with inputs that need no gradient); the KV cache is off while training anyway."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
