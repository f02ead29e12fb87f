"""The replay buffer (DESIGN §3): FIFO Arrow record batches, persisted as IPC segments, restorable.

`ReplayBuffer` is plain Python; the driver makes it an actor with `ray.remote(ReplayBuffer)`. Keep the
actor's default `max_concurrency=1`: Ray then runs one method at a time, so `add` and `sample` never
interleave (a lock guards the state as well, for direct multi-threaded use).

Durability contract of `add` (what "acknowledged" means):
    1. the batch is written to `run_dir/buffer/seg-<seq>.arrow.tmp`, fsynced, renamed to `seg-<seq>.arrow`;
    2. the manifest (`manifest.json`: the ordered list of live segments, and for a partly evicted oldest
       segment how many of its head rows are gone) is written the same way (temp, fsync, rename, dir fsync);
    3. only then is the in-memory state updated, files of evicted segments deleted, and `add` returns.
A crash before step 2 completes leaves the previous manifest in force; stray `.tmp` files and segment
files the manifest does not list are removed at the next start. So every row `add` acknowledged before a
crash is restored, unless eviction removed it.

Staleness: `sample(min_version=v)` keeps model rows with `policy_version >= v` and *always* keeps data
rows (version -1): expert data never goes stale, so the filter applies to model rows only.

One `ReplayBuffer` is one shard of a run's replay buffer (`buffer.shards`, sm_dist/buffer/shards.py):
`shard=None` lives in `run_dir/buffer/`, `shard=k` in `run_dir/buffer/shard-<k>/`; everything above
holds per shard (its own manifest, its own FIFO).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sm_dist.buffer.schema import (
    DATA_POLICY_VERSION,
    SCHEMA,
    SCHEMA_VERSION,
    check_version,
    empty_batch,
    validate_batch,
)
from sm_dist.buffer.shards import MANIFEST, buffer_dir, saved_shards, shard_dirs

log = logging.getLogger(__name__)

_SEG_PREFIX, _SEG_SUFFIX, _TMP_SUFFIX = "seg-", ".arrow", ".tmp"


@dataclass(frozen=True)
class Segment:
    """One persisted batch. `offset` head rows are evicted (the file keeps them; the manifest records it)."""

    seq: int
    batch: pa.RecordBatch  # the live rows only (already sliced by `offset`)
    offset: int = 0

    @property
    def file(self) -> str:
        return f"{_SEG_PREFIX}{self.seq:012d}{_SEG_SUFFIX}"

    @property
    def rows(self) -> int:
        return self.batch.num_rows

    @property
    def nbytes(self) -> int:
        return self.batch.nbytes


def plan_eviction(
    segments: list[Segment], capacity_rows: int, capacity_bytes: int
) -> tuple[list[Segment], list[Segment], int]:
    """FIFO: drop oldest rows until both capacities hold. Returns (kept, fully evicted, rows evicted).

    Whole oldest segments go first; when only part of the oldest is over capacity, its head is sliced
    off (by rows, or by an even per-row share of its bytes), so capacity is met to within one row.
    """
    kept = list(segments)
    dropped: list[Segment] = []
    evicted_rows = 0
    rows, nbytes = sum(s.rows for s in kept), sum(s.nbytes for s in kept)
    while kept and (rows > capacity_rows or nbytes > capacity_bytes):
        head = kept[0]
        need = max(0, rows - capacity_rows)
        if nbytes > capacity_bytes:
            per_row = max(1, head.nbytes // max(1, head.rows))
            need = max(need, -(-(nbytes - capacity_bytes) // per_row))
        need = max(1, need)
        if need >= head.rows:
            kept.pop(0)
            dropped.append(head)
            evicted_rows += head.rows
            rows, nbytes = rows - head.rows, nbytes - head.nbytes
        else:
            sliced = replace(head, batch=head.batch.slice(need), offset=head.offset + need)
            kept[0] = sliced
            evicted_rows += need
            rows, nbytes = rows - need, nbytes - head.nbytes + sliced.nbytes
    return kept, dropped, evicted_rows


def _eligible(table: pa.Table, min_version: int | None) -> np.ndarray:
    """Indices of the rows `sample` may draw: every data row, and model rows of `min_version` or newer."""
    if min_version is None:
        return np.arange(table.num_rows)
    pv = table.column("policy_version")
    keep = pc.or_(pc.equal(pv, DATA_POLICY_VERSION), pc.greater_equal(pv, min_version))
    return np.flatnonzero(keep.to_numpy(zero_copy_only=False))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """write(tmp_path) → fsync → rename over `path` → fsync the directory. OSError names the path."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(
            e.errno,
            f"replay buffer could not write {path} ({e.strerror or e}); the manifest still lists only "
            f"the batches acknowledged so far. Free disk space in {path.parent} or point run_dir elsewhere.",
        ) from e


def _write_segment(path: Path, batch: pa.RecordBatch) -> None:
    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_batch(batch)

    _write_atomic(path, write)


def _read_segment(path: Path) -> pa.RecordBatch:
    table = _read_segment_table(path)
    return table.combine_chunks().to_batches()[0] if table.num_rows else empty_batch()


def _read_segment_table(path: Path) -> pa.Table:
    # OSFile reads into memory (no memory map), so the file can be deleted while its rows live on.
    with pa.OSFile(str(path), "rb") as source:
        return pa.ipc.open_file(source).read_all()


class ReplayBuffer:
    """FIFO replay buffer of `SCHEMA` rows, capped by rows and bytes, persisted under `run_dir/buffer/`
    (shard k of a sharded buffer: `run_dir/buffer/shard-<k>/`).

    Public methods: `add`, `sample` (`sample_and_count`), `stats`, `read_all`. With `run_dir=None` it lives in
    memory only.
    """

    def __init__(
        self, run_dir: str | None, capacity_rows: int, capacity_bytes: int, seed: int = 0,
        shard: int | None = None,
    ):  # fmt: skip
        if capacity_rows < 1 or capacity_bytes < 1:
            raise ValueError(
                f"capacity_rows={capacity_rows}, capacity_bytes={capacity_bytes}: both must be >= 1 "
                "(set buffer.capacity_rows / buffer.capacity_bytes)"
            )
        self.capacity_rows, self.capacity_bytes = capacity_rows, capacity_bytes
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._next_seq = 0
        self._added_rows = self._evicted_rows = 0
        self._lost_segments = self._lost_rows = 0
        self._dir = buffer_dir(run_dir, shard) if run_dir is not None else None
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._restore()

    # ---- public API -------------------------------------------------------------------------------

    def add(self, batch: pa.RecordBatch) -> int:
        """Persist `batch`, then append it (evicting FIFO); return the total rows acknowledged so far.

        Raises ValueError for a batch that is not `SCHEMA`, OSError (naming the file) when the disk
        write fails; in both cases the buffer and its manifest are unchanged.
        """
        validate_batch(batch)
        with self._lock:
            if batch.num_rows == 0:
                return self._added_rows
            seg = Segment(seq=self._next_seq, batch=batch.replace_schema_metadata(SCHEMA.metadata))
            if self._dir is not None:
                _write_segment(self._dir / seg.file, seg.batch)
            kept, dropped, evicted = plan_eviction(
                [*self._segments, seg], self.capacity_rows, self.capacity_bytes
            )
            counters = (self._added_rows + batch.num_rows, self._evicted_rows + evicted)
            if self._dir is not None:
                try:
                    self._write_manifest(kept, seg.seq + 1, *counters)
                except OSError:
                    (self._dir / seg.file).unlink(missing_ok=True)
                    raise
            self._segments, self._next_seq = kept, seg.seq + 1
            self._added_rows, self._evicted_rows = counters
            self._delete_files(dropped)
            return self._added_rows

    def sample(self, n: int, min_version: int | None = None, newest_first: bool = False) -> pa.RecordBatch:
        """Return up to `n` distinct rows: uniformly at random, or the newest `n` (newest first).

        `min_version` drops model rows with `policy_version < min_version`; data rows (version -1) are
        always eligible (module docstring). Fewer than `n` rows come back when fewer are eligible.
        """
        return self.sample_and_count(n, min_version, newest_first)[0]

    def sample_and_count(
        self, n: int, min_version: int | None = None, newest_first: bool = False
    ) -> tuple[pa.RecordBatch, int]:
        """`sample`, and how many rows were eligible: one call gives a sharded buffer both the rows and
        the counts it splits a rank's draw by (sm_dist/buffer/shards.py)."""
        if n < 0:
            raise ValueError(f"sample(n={n}): n must be >= 0")
        with self._lock:
            table = pa.Table.from_batches([s.batch for s in self._segments], schema=SCHEMA)
        eligible = _eligible(table, min_version)
        k = min(n, len(eligible))
        if k == 0:
            return empty_batch(), len(eligible)
        idx = eligible[::-1][:k] if newest_first else self._rng.choice(eligible, size=k, replace=False)
        return table.take(pa.array(idx, type=pa.int64())).combine_chunks().to_batches()[0], len(eligible)

    def stats(self) -> dict:
        """Counters for logs and the driver: live rows/bytes/segments, totals, per-source rows, newest version."""
        with self._lock:
            segs = list(self._segments)
            out = {
                "rows": sum(s.rows for s in segs),
                "bytes": sum(s.nbytes for s in segs),
                "segments": len(segs),
                "added_rows": self._added_rows,
                "evicted_rows": self._evicted_rows,
                "lost_segments": self._lost_segments,
                "lost_rows": self._lost_rows,
                "pid": os.getpid(),
            }
        rows_by_source = {"data": 0, "model": 0}
        newest = None
        for s in segs:
            counts = pc.value_counts(s.batch.column("source").cast(pa.string()))
            for item in counts.to_pylist():
                rows_by_source[item["values"]] += item["counts"]
            v = pc.max(s.batch.column("policy_version")).as_py()
            newest = v if newest is None else max(newest, v)
        out["rows_by_source"] = rows_by_source
        out["newest_version"] = newest
        return out

    def read_all(self) -> pa.Table:
        """Every live row, oldest first (for inspection and tests)."""
        with self._lock:
            return pa.Table.from_batches([s.batch for s in self._segments], schema=SCHEMA)

    # ---- persistence ------------------------------------------------------------------------------

    def _write_manifest(self, segments: list[Segment], next_seq: int, added: int, evicted: int) -> None:
        doc = {
            "schema_version": SCHEMA_VERSION,
            "next_seq": next_seq,
            "added_rows": added,
            "evicted_rows": evicted,
            "segments": [{"file": s.file, "offset": s.offset, "rows": s.rows} for s in segments],
        }
        _write_atomic(self._dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))

    def _delete_files(self, segments: list[Segment]) -> None:
        if self._dir is None:
            return
        for s in segments:
            (self._dir / s.file).unlink(missing_ok=True)

    def _restore(self) -> None:
        """Load every segment the manifest lists; warn about (and count) missing or corrupt ones."""
        path = self._dir / MANIFEST
        doc = _load_manifest(path) if path.exists() else None
        if doc is not None:
            self._next_seq = int(doc["next_seq"])
            self._added_rows, self._evicted_rows = int(doc["added_rows"]), int(doc["evicted_rows"])
            for entry in doc["segments"]:
                seg = self._load_entry(entry)
                if seg is not None:
                    self._segments.append(seg)
        listed = {s.file for s in self._segments} | {MANIFEST}
        stray = [
            p
            for p in self._dir.iterdir()
            if p.name not in listed and (p.name.startswith(_SEG_PREFIX) or p.name.endswith(_TMP_SUFFIX))
        ]
        for p in stray:  # unacknowledged temp files, evicted or lost segments
            p.unlink(missing_ok=True)
        if stray:
            log.info("replay buffer %s: removed %d stray file(s) not in the manifest", self._dir, len(stray))
        kept, dropped, evicted = plan_eviction(self._segments, self.capacity_rows, self.capacity_bytes)
        self._segments, self._evicted_rows = kept, self._evicted_rows + evicted
        if doc is not None:
            self._write_manifest(kept, self._next_seq, self._added_rows, self._evicted_rows)
            self._delete_files(dropped)
            log.info(
                "replay buffer %s: restored %d rows in %d segments (%d segments lost)",
                self._dir,
                sum(s.rows for s in kept),
                len(kept),
                self._lost_segments,
            )

    def _load_entry(self, entry: dict) -> Segment | None:
        file, offset, rows = entry["file"], int(entry["offset"]), int(entry["rows"])
        seq = int(file[len(_SEG_PREFIX) : -len(_SEG_SUFFIX)])
        try:
            batch = _read_segment(self._dir / file)
            if batch.num_rows != offset + rows:
                raise ValueError(f"has {batch.num_rows} rows, manifest says {offset} evicted + {rows} live")
            validate_batch(batch)
        except (OSError, ValueError, pa.ArrowException) as e:
            log.warning(
                "replay buffer: segment %s is missing or corrupt (%s); its %d rows are lost",
                self._dir / file,
                e,
                rows,
            )
            self._lost_segments += 1
            self._lost_rows += rows
            return None
        return Segment(seq=seq, batch=batch.slice(offset), offset=offset)


def _load_manifest(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc.get("segments"), list):
            raise ValueError("no 'segments' list")
    except (json.JSONDecodeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"replay-buffer manifest {path} is unreadable ({e}); it is only ever replaced atomically, so "
            "something else wrote it. Restore it from a backup or move the buffer dir aside to start empty."
        ) from e
    check_version(doc.get("schema_version"), f"replay-buffer manifest {path}")
    return doc


def read_run_buffer(run_dir: str | os.PathLike, retries: int = 3, shard: int | None = None) -> pa.Table:
    """Read a run's live buffer rows with plain pyarrow (no Ray, no actor): every shard's, shard by
    shard, each oldest first (`shard=k`: shard k's alone). Follows each manifest, so evicted head rows
    of a partly evicted segment are skipped. FileNotFoundError, naming the path, when there is none."""
    dirs = shard_dirs(run_dir, saved_shards(run_dir) or 1)
    if shard is not None:
        if not 0 <= shard < len(dirs):
            raise ValueError(f"{run_dir}: its replay buffer has {len(dirs)} shard(s), so no shard {shard}")
        dirs = [dirs[shard]]
    found = [d for d in dirs if (d / MANIFEST).exists()]  # a shard no row reached has no manifest yet
    if not found:
        raise FileNotFoundError(
            f"no replay-buffer manifest at {dirs[0] / MANIFEST}; is {run_dir} a run dir with a buffer?"
        )
    return pa.concat_tables([_read_dir(d, retries) for d in found])


def _read_dir(bdir: Path, retries: int) -> pa.Table:
    """One buffer folder's live rows. On a live run a listed segment can be evicted (deleted) between
    reading the manifest and the file: then the manifest is read again, up to `retries` times."""
    path = bdir / MANIFEST
    for attempt in range(retries + 1):
        doc = _load_manifest(path)
        try:
            tables = [
                _read_segment_table(bdir / e["file"]).slice(int(e["offset"]), int(e["rows"]))
                for e in doc["segments"]
            ]
        except FileNotFoundError:
            if attempt == retries:
                raise
            continue
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    raise AssertionError("unreachable")
