"""Run checkpoints: `<run_dir>/checkpoints/step-XXXXXXXX/` written to a temp dir, then renamed.

Layout of one checkpoint (what `sm-dist train --resume RUN_DIR` reads):

    model/                  HF folder (safetensors + tokenizer): loadable by transformers and vLLM
    state/                  model + AdamW state as torch.distributed.checkpoint: `__<rank>_0.distcp`
                            written by each learner rank (its own shard), `.metadata` the index
                            (sm_dist.learner.sharded); loads onto any strategy and number of ranks
    learner_state.json      learner counters (step, skipped steps, sequences) and the LR schedule
    run_state.json          driver state: step, weights version, syncs applied per worker, expert rows
    buffer_manifest.json    copy of the replay buffer's manifest at checkpoint time (rows it held); with
                            buffer.shards > 1, `buffer_manifest.shard-<k>.json`, one per shard
    manifest.json           size and sha256 of every other file; written last, just before the rename

`learner_state.json` records the checkpoint format (`VERSION`); a checkpoint of another version (1:
before `state/` and this field, with `optimizer.pt`) is refused with one line (`check_version`), never
converted. Every rank writes into the same temp folder, which the driver renames: `run.run_dir` must be one filesystem for all of them (checked at start-up,
`sm_dist.orchestrator.storage`). A crash while writing leaves only `step-XXXXXXXX.tmp`, which the next run deletes; `keep_last`
completed checkpoints are kept. `verify` checks a checkpoint before a resume trusts it: against its
manifest, then structurally (JSON files parse, safetensors headers match their file sizes, `state/`'s
index names shard files that are there and long enough). One without a manifest gets the structural
checks only.
A corrupt checkpoint found on resume is renamed `step-XXXXXXXX.corrupt` (`set_aside`): kept, never
deleted, and out of the way of a new checkpoint of the same step and of pruning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

_PREFIX, _TMP, _CORRUPT = "step-", ".tmp", ".corrupt"
MANIFEST = "manifest.json"
_DONE = re.compile(r"step-(\d+)")
# what every checkpoint holds (learner rank 0 writes the first two, `commit` the last), besides the
# training state `state/` (DCP shards)
REQUIRED = ("model/config.json", "learner_state.json", "run_state.json")
STATE = "state"
VERSION = 2  # the format (learner_state.json's "checkpoint_version"); 1: optimizer.pt, before state/
VERSION_KEY = "checkpoint_version"


def check_version(ckpt: str | Path) -> None:
    """Raise a `CheckpointError` (one line: the version found, the one needed, the fix) unless `ckpt`'s
    learner_state.json records format `VERSION`. A missing or unreadable file passes: `verify` names it."""
    from sm_dist.errors import CheckpointError

    try:
        found = json.loads((Path(ckpt) / "learner_state.json").read_text()).get(VERSION_KEY, 1)
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return
    if found != VERSION:
        raise CheckpointError(
            str(ckpt), f"is a checkpoint of format version {found}; this sm-dist reads version {VERSION} only.",
            "start a fresh run dir (another run.run_dir), or resume it with the sm-dist that wrote it",
        )  # fmt: skip


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoints, oldest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if _DONE.fullmatch(p.name)]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temp folder for the checkpoint of `step` (stale temp folders are removed)."""
    d = checkpoints_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(f"*{_TMP}"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = d / f"{_PREFIX}{step:08d}{_TMP}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, run_state: dict, run_dir: str | Path, keep_last: int) -> Path:
    """Write run_state.json, the buffer manifest copies (one per replay shard) and (last) manifest.json,
    rename tmp -> final, prune to `keep_last`."""
    from sm_dist.buffer.shards import manifest_paths

    (tmp / "run_state.json").write_text(json.dumps(run_state, indent=1))
    for name, manifest in manifest_paths(run_dir).items():
        if manifest.exists():  # a shard no row has reached yet has none
            shutil.copy2(manifest, tmp / name)
    write_manifest(tmp)
    final = tmp.with_name(tmp.name[: -len(_TMP)])
    if final.exists():  # the same step checkpointed twice (e.g. a final checkpoint after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_run_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "run_state.json").read_text())


def pin_model(ckpt: Path, run_dir: str | Path) -> Path:
    """`<run_dir>/resumed-model`: a copy of `ckpt/model` that outlives the checkpoint, which `keep_last`
    prunes while the run goes on. A rollout worker that Ray restarts re-runs its constructor on the same
    folder, so a resumed run must not start its actors on the checkpoint itself. Hard links where the
    filesystem allows (checkpoints are never modified in place), else copies.

    A LoRA checkpoint's `model/` is an adapter folder (`sm_dist.learner.lora`): the actors start on the
    base folder it names (not pruned: it is the run's model.dir), the learners load the adapter from
    `state/`, and the resumed run's first publish sends the merged weights."""
    from sm_dist.learner.lora import base_dir, is_adapter_dir

    if is_adapter_dir(Path(ckpt) / "model"):
        return Path(base_dir(Path(ckpt) / "model"))
    dst = Path(run_dir) / "resumed-model"
    tmp = dst.with_name(dst.name + _TMP)
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src: str, to: str) -> None:
        try:
            os.link(src, to)
        except OSError:
            shutil.copy2(src, to)

    shutil.copytree(Path(ckpt) / "model", tmp, copy_function=link)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


# ---- integrity ---------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> Path:
    """`ckpt/manifest.json`: {"files": {relative path: {"size", "sha256"}}} of every other file."""
    d = Path(ckpt)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    with (d / MANIFEST).open("w") as f:
        json.dump({"version": 1, "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return d / MANIFEST


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at `path` cannot be loaded (its header and size disagree), or None.
    Reads the header only: 8 bytes of length, then JSON with each tensor's byte range."""
    path, name = Path(path), Path(path).name
    size = path.stat().st_size
    if size < 8:
        return f"{name} is {size} bytes, too short for a safetensors file"
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return (
                f"{name}: its header says {n} bytes but the file has {size} (truncated, or not safetensors)"
            )
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, IndexError):
            return f"{name}: its header is not safetensors JSON (corrupt)"
    if 8 + n + end != size:
        return f"{name}: its tensors end at byte {8 + n + end} but the file has {size} bytes (truncated?)"
    return None


def _structure_problem(d: Path) -> str | None:
    """What a manifest cannot tell: every required file present, JSON parses, weights and training
    state readable (safetensors headers, `state/`'s index and shard sizes)."""
    for rel in REQUIRED:
        if not (d / rel).is_file():
            return f"{rel} is missing"
    for rel in ("run_state.json", "learner_state.json", "model/config.json"):
        try:
            json.loads((d / rel).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"{rel} is not valid JSON ({e})"
    weights = sorted((d / "model").glob("*.safetensors"))
    if not weights:
        return "model/ holds no *.safetensors weights"
    for w in weights:
        if problem := safetensors_problem(w):
            return f"model/{problem}"
    if not (d / STATE).is_dir():
        return f"{STATE}/ (the training state) is missing"
    from sm_dist.learner.sharded import storage_problem

    return storage_problem(d / STATE)


def verify(ckpt: str | Path) -> tuple[str | None, bool]:
    """(why `ckpt` cannot be resumed from, or None; whether it had a manifest to check against). A
    checkpoint of another format version is not damaged: it raises (`check_version`), never set aside."""
    d = Path(ckpt)
    check_version(d)
    if not (d / MANIFEST).is_file():
        return _structure_problem(d), False
    try:
        files = json.loads((d / MANIFEST).read_text())["files"]
        items = [(rel, int(m["size"]), str(m["sha256"])) for rel, m in files.items()]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})", True
    for rel, size, sha in items:
        f = d / rel
        if not f.is_file():
            return f"{rel} is missing (listed in {MANIFEST})", True
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {MANIFEST} says {size}", True
        if _sha256(f) != sha:
            return f"{rel} does not match its sha256 in {MANIFEST}", True
    return _structure_problem(d), True


def set_aside(ckpt: Path) -> Path:
    """Rename a corrupt checkpoint to `step-XXXXXXXX.corrupt` (a numbered suffix if taken); kept as is."""
    dst = Path(ckpt).with_name(Path(ckpt).name + _CORRUPT)
    n = 1
    while dst.exists():
        n += 1
        dst = Path(ckpt).with_name(f"{Path(ckpt).name}{_CORRUPT}{n}")
    os.replace(ckpt, dst)
    return dst
