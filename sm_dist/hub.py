"""Hugging Face hub model ids for `model.dir` and `sm-dist add-bkspc`: resolved to the local folder that
huggingface_hub's cache holds (`snapshot_download`), so everything downstream (the learners, vLLM, the
checkpoints) sees a plain folder. Offline (HF_HUB_OFFLINE=1, how sm-dist runs vLLM) only the cache is
looked at; online the cache first, then the hub. A name that exists as a local path is never an id.
"""

from __future__ import annotations

import os
from pathlib import Path

from sm_dist.errors import ModelError


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def resolve_model(raw: str, bases: list[Path] | None = None, what: str | None = None) -> str | None:
    """The cached folder of hub model id `raw`, or None when `raw` is a local path (or has no id's
    shape). Raises a one-line `ModelError` naming the cache and HF_HUB_OFFLINE when the id is not there."""
    from sm_dist.data.sources import HUB_ID

    if not HUB_ID.fullmatch(raw) or any((b / raw).exists() for b in [*(bases or []), Path.cwd()]):
        return None
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(raw, local_files_only=True)
    except Exception as cached_err:  # noqa: BLE001 -- not in the cache (LocalEntryNotFoundError, ...)
        err: Exception = cached_err
        if not offline():
            try:
                return snapshot_download(raw)
            except Exception as e:  # noqa: BLE001 -- no network, no such repo, gated, ...
                err = e
    state = "offline (HF_HUB_OFFLINE=1)" if offline() else "online, but the download failed"
    raise ModelError(
        what or raw,
        f"{raw!r} is not a local folder, and the Hugging Face cache {constants.HF_HUB_CACHE} does not hold a "
        f"model of that id ({state}: {type(err).__name__}).",
        "download it where the hub is reachable (HF_HUB_OFFLINE=0; `huggingface-cli download ID`), point HF_HOME "
        "at a cache that holds it, or give a local model folder",
    )
