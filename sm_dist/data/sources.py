"""Where expert rows come from: `data.train_path` as a local file, a glob of files, a `datasets`
`save_to_disk` folder, or a Hugging Face hub dataset id (resolved through the local cache).

    for line, record in records(path, fmt, split="train", name=None):   # (1-based row, dict or text)

Nothing is read whole: jsonl/text are read line by line, parquet by row groups (`iter_batches`), Arrow
IPC files memory-mapped, csv through the csv module's reader, and `datasets` folders / hub datasets are
Arrow tables memory-mapped by `datasets` itself (`load_from_disk`, `load_dataset`). A glob's rows keep
their own file's line numbers, reported as `<file name>:<line>`.

Imports no torch and no `datasets` at module level (the config validator imports this module).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sm_dist.errors import DataError

GLOB_CHARS = re.compile(r"[*?\[]")
# an id on the hub: `name` or `owner/name` (letters, digits, - _ .), never a path with a known suffix
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes (Dataset, DatasetDict)
BATCH = 1024


class BadRow(Exception):
    """A row that cannot become an example: `reason` (counted in the load report) and `detail`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def is_glob(path: str | Path) -> bool:
    return bool(GLOB_CHARS.search(str(path)))


def is_saved_dataset(path: str | Path) -> bool:
    return any((Path(path) / m).is_file() for m in SAVED_MARKERS)


def is_hub_id(raw: str, bases: list[Path] | None = None) -> bool:
    """`raw` names a hub dataset: it has the shape of one, no data-file suffix, and no such local path
    exists (relative to `bases`, or the current folder)."""
    if not HUB_ID.fullmatch(raw) or Path(raw).suffix.lower() in _SUFFIXES:
        return False
    return not any((b / raw).exists() for b in [*(bases or []), Path.cwd()]) and not Path(raw).is_absolute()


def source_exists(raw: str) -> bool:
    """Whether `data.train_path` points at something to read: a path, a glob with matches, a hub id
    (whether the cache holds it is checked when it is read)."""
    if is_glob(raw):
        return bool(glob.glob(raw))
    return Path(raw).exists() or is_hub_id(raw)


# ---- readers ------------------------------------------------------------------------------------------


def read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    """Row groups one batch at a time (never the whole table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            str(path), f"is not a readable parquet file ({e}).", "pass a parquet file, or set data.format"
        ) from None
    n = 0
    for batch in pf.iter_batches(batch_size=BATCH):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def read_arrow(path: Path) -> Iterator[tuple[int, dict]]:
    """An Arrow IPC file or stream (what `datasets` writes), memory-mapped."""
    import pyarrow as pa

    try:
        src = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(src)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            src.seek(0)
            batches = iter(pa.ipc.open_stream(src))
    except (pa.ArrowException, OSError) as e:
        raise DataError(str(path), f"is not a readable Arrow file ({e}).", "pass an Arrow IPC file") from None
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield n, row


def read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """A csv with a header row; every value a string (no type guessing: "12" stays a text)."""
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        for i, row in enumerate(csv.DictReader(f)):
            yield i + 2, row  # the header is line 1


def _rows(ds) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(ds):
        yield i + 1, row


def read_saved(path: Path, split: str) -> Iterator[tuple[int, dict]]:
    """A `save_to_disk` folder (a Dataset, or a DatasetDict and its `split`), memory-mapped."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(
                str(path),
                f"has splits {sorted(ds)}, not {split!r}.",
                f"set data.split to one of {sorted(ds)}",
            )
        ds = ds[split]
    return _rows(ds)


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def read_hub(dataset_id: str, split: str, name: str | None) -> Iterator[tuple[int, dict]]:
    """A hub dataset by id, through `datasets.load_dataset` (its Arrow cache, memory-mapped). Offline
    (HF_HUB_OFFLINE=1, how sm-dist runs vLLM) only what the cache holds can load."""
    from datasets import load_dataset

    try:
        ds = load_dataset(dataset_id, name=name, split=split)
    except Exception as e:  # noqa: BLE001 -- datasets fails in many ways for a missing or uncached id
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
        why = " ".join(str(e).split())[:300]
        raise DataError(
            dataset_id,
            f"is not a local path, and loading it as a hub dataset (split {split!r}, name {name!r}) failed"
            f"{' offline (HF_HUB_OFFLINE=1)' if offline else ''}: {type(e).__name__}: {why}.",
            f"download it once where the hub is reachable (HF_HUB_OFFLINE=0) into the cache {hub_cache()} "
            "(or point HF_HOME at a cache that holds it), or set data.train_path to a local file or folder",
        ) from None
    return _rows(ds)


# ---- formats ------------------------------------------------------------------------------------------


def _file_format(path: Path, fmt: str | None) -> DataFormat:
    fmt = fmt or next((k for k, f in FORMATS.items() if path.suffix.lower() in f.suffixes), None)
    if fmt not in FORMATS:
        raise DataError(
            str(path),
            f"cannot tell its format from the suffix {path.suffix!r} (format {fmt!r}).",
            f"use a suffix of {sorted(s for f in FORMATS.values() for s in f.suffixes)}, or set data.format",
        )
    return FORMATS[fmt]


def records(raw: str, fmt: str | None, split: str, name: str | None):
    """(line, raw record, its decoder) of every row of `raw` (see `load_examples`)."""
    path = Path(raw)
    if is_glob(raw):
        files = sorted(Path(f) for f in glob.glob(raw) if Path(f).is_file())
        if not files:
            raise DataError(raw, "matches no file.", "fix the pattern, or point data.train_path at a file")
        for f in files:
            form = _file_format(f, fmt)
            yield from ((f"{f.name}:{n}", r, form.decode) for n, r in form.read(f))
    elif path.is_dir():
        if not is_saved_dataset(path):
            raise DataError(
                raw, "is a folder, but not one `datasets` save_to_disk wrote (no state.json / dataset_dict.json).",
                "pass a data file, a glob of files (data/*.jsonl), or a save_to_disk folder",
            )  # fmt: skip
        yield from ((n, r, _object) for n, r in read_saved(path, split))
    elif path.is_file():
        form = _file_format(path, fmt)
        yield from ((n, r, form.decode) for n, r in form.read(path))
    elif is_hub_id(raw):
        yield from ((n, r, _object) for n, r in read_hub(raw, split, name))
    else:
        raise DataError(
            raw,
            "does not exist.",
            "pass a jsonl/parquet/text/arrow/csv file, a glob, a save_to_disk folder or a hub id",
        )


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line (blank lines separate nothing). Bytes:
    a line that is not UTF-8 is a bad row of its own (`_utf8`), not the end of the file."""
    with path.open("rb") as f:
        for i, line in enumerate(f):
            if line.strip():
                yield i + 1, line.rstrip(b"\r\n")


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRow(
            "not_utf8", f"byte {raw[e.start : e.start + 1]!r} at column {e.start + 1} is not UTF-8"
        ) from None


def _decode_json(raw: bytes) -> dict:
    try:
        return _object(json.loads(_utf8(raw)))
    except json.JSONDecodeError as e:
        raise BadRow("malformed_json", f"{e.msg} at column {e.colno}") from None


def _object(raw) -> dict:
    if not isinstance(raw, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(raw).__name__}")
    return raw


@dataclass(frozen=True)
class DataFormat:
    """A file format: the suffixes it is inferred from, a reader of (1-based line, raw record), and a
    decoder of one raw record into a dict of fields or a plain text (raising BadRow when it cannot)."""

    suffixes: tuple[str, ...]
    read: Callable[[Path], Iterator[tuple[int, object]]]
    decode: Callable[[object], dict | str]


# Adding a format = one entry here and its kind in sm_dist/config/data.py (tests/unit/test_config_registries.py).
FORMATS: dict[str, DataFormat] = {
    "jsonl": DataFormat((".jsonl", ".json"), _read_lines, _decode_json),
    "parquet": DataFormat((".parquet",), read_parquet, _object),
    "text": DataFormat((".txt", ".text"), _read_lines, _utf8),
    "arrow": DataFormat((".arrow",), read_arrow, _object),
    "csv": DataFormat((".csv",), read_csv, _object),
}


_SUFFIXES = {s for f in FORMATS.values() for s in f.suffixes}
