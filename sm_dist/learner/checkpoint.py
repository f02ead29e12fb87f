"""Run checkpoints: `<run_dir>/checkpoints/step-XXXXXXXX/` written to a temp dir, then renamed.

Layout of one checkpoint (what `sm-dist train --resume RUN_DIR` reads):

    model/                  HF folder (safetensors + tokenizer): loadable by transformers and vLLM
    optimizer.pt            AdamW + LR scheduler state (rank 0; full state under FSDP2)
    learner_state.json      learner counters (step, skipped steps, sequences)
    run_state.json          driver state: step, weights version, syncs applied per worker, expert rows
    buffer_manifest.json    copy of the replay buffer's manifest at checkpoint time (rows it held)

A crash while writing leaves only `step-XXXXXXXX.tmp`, which the next run deletes; `keep_last`
completed checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

_PREFIX, _TMP = "step-", ".tmp"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoints, oldest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.name.startswith(_PREFIX) and not p.name.endswith(_TMP)]
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
    """Write run_state.json and the buffer manifest copy, rename tmp -> final, prune to `keep_last`."""
    (tmp / "run_state.json").write_text(json.dumps(run_state, indent=1))
    manifest = Path(run_dir) / "buffer" / "manifest.json"
    if manifest.exists():
        shutil.copy2(manifest, tmp / "buffer_manifest.json")
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
    filesystem allows (checkpoints are never modified in place), else copies."""
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
