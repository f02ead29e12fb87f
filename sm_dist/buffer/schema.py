"""The Arrow rollout schema (DESIGN §3): the one place its columns, types and writers are defined.

Every row that flows from the data pipeline or a rollout worker into the replay buffer, and from the
buffer to the learner, is one row of `SCHEMA`. Writers build rows as plain dicts and call
`rows_to_batch`, which validates every field and names the offending row and column; the buffer calls
`validate_batch` on whatever it is handed. `SCHEMA_VERSION` is stored in the schema metadata (so in
every persisted segment) and in each buffer manifest: bump it whenever a column is added, removed or
retyped, or its meaning changes. A buffer of another version is refused (`check_version`), never
converted.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

# 3: a data row's `is_noise` is its only noise record (empty: no noise); v2 readers inferred flags
# for a flagless data row from its <bkspc> actions. 2: is_noise added.
SCHEMA_VERSION = 3
SCHEMA_VERSION_KEY = b"sm_dist.schema_version"

SOURCES = ("data", "model")  # dictionary values of `source`, in this fixed order (index 0, 1)
FINISH_REASONS = ("eos", "length", "action_cap")
DATA_POLICY_VERSION = -1  # expert data was produced by no policy
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

SOURCE_TYPE = pa.dictionary(pa.int8(), pa.string())
SCHEMA = pa.schema(
    [
        # string; data pipeline / rollout worker. Unique across the run (the buffer relies on it for audits).
        pa.field("sample_id", pa.string(), nullable=False),
        # list<int32>; both writers. Prompt token ids, never containing <bkspc>.
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        # list<int32>; both writers. Every action after the prompt: tokens, <bkspc>, deleted tokens, eos.
        pa.field("action_ids", pa.list_(pa.int32()), nullable=False),
        # list<int32>; both writers. collapse(prompt + actions) minus the prompt: what a reader sees.
        pa.field("final_ids", pa.list_(pa.int32()), nullable=False),
        # dictionary<int8, string>; both writers. "data" (augmented expert) or "model" (rollout).
        pa.field("source", SOURCE_TYPE, nullable=False),
        # int64; rollout worker writes the weights version it ran; the data pipeline writes -1.
        pa.field("policy_version", pa.int64(), nullable=False),
        # list<float32>; rollout worker (behaviour log-prob per action, diagnostic); data rows: empty.
        pa.field("logprobs", pa.list_(pa.float32()), nullable=False),
        # string; both writers. One of FINISH_REASONS; data rows are always "eos".
        pa.field("finish_reason", pa.string(), nullable=False),
        # string; both writers. Provenance: the worker (or "data") that built the row.
        pa.field("worker_id", pa.string(), nullable=False),
        # timestamp[us, UTC]; both writers (rows_to_batch fills "now" when absent).
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # list<bool>; data pipeline: per action, True at an injected noise token (the objective does not
        # imitate it with objective.mask_noise_actions); rollout worker: empty (rows_to_batch's default).
        pa.field("is_noise", pa.list_(pa.bool_()), nullable=False),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
COLUMNS = tuple(SCHEMA.names)
_INT_LIST_COLUMNS = ("prompt_ids", "action_ids", "final_ids")
_OPTIONAL = ("created_at", "is_noise")  # filled by rows_to_batch: now, and no noise flags


def _check_int_list(value, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list of int32 token ids, got {type(value).__name__}")
    for j, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not _INT32_MIN <= v <= _INT32_MAX:
            raise ValueError(f"{where}[{j}]: expected an int32 token id, got {v!r}")
    return list(value)


def _check_float_list(value, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list of floats, got {type(value).__name__}")
    for j, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"{where}[{j}]: expected a float log-prob, got {v!r}")
    return [float(v) for v in value]


def _check_str(value, where: str, allowed: Sequence[str] | None = None) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"{where}: {value!r} is not one of {list(allowed)}")
    return value


def _check_row(row: dict, i: int, now: dt.datetime) -> dict:
    """Return a normalised copy of `row` or raise a ValueError naming row `i` and the column."""
    if not isinstance(row, dict):
        raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise ValueError(f"row {i}: unknown column(s) {unknown}; the schema has {list(COLUMNS)}")
    missing = [c for c in COLUMNS if c not in row and c not in _OPTIONAL]
    if missing:
        raise ValueError(f"row {i}: missing column(s) {missing}")
    out = {"sample_id": _check_str(row["sample_id"], f"row {i} column 'sample_id'")}
    for c in _INT_LIST_COLUMNS:
        out[c] = _check_int_list(row[c], f"row {i} column {c!r}")
    out["source"] = _check_str(row["source"], f"row {i} column 'source'", SOURCES)
    pv = row["policy_version"]
    if isinstance(pv, bool) or not isinstance(pv, int):
        raise ValueError(f"row {i} column 'policy_version': expected an int, got {pv!r}")
    out["policy_version"] = pv
    out["logprobs"] = _check_float_list(row["logprobs"], f"row {i} column 'logprobs'")
    out["finish_reason"] = _check_str(row["finish_reason"], f"row {i} column 'finish_reason'", FINISH_REASONS)
    out["worker_id"] = _check_str(row["worker_id"], f"row {i} column 'worker_id'")
    created = row.get("created_at") or now
    if not isinstance(created, dt.datetime) or created.tzinfo is None:
        raise ValueError(f"row {i} column 'created_at': expected a timezone-aware datetime, got {created!r}")
    out["created_at"] = created
    flags = row.get("is_noise") or []
    if not isinstance(flags, (list, tuple)) or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"row {i} column 'is_noise': expected a list of bools, got {flags!r}")
    out["is_noise"] = list(flags)
    _check_semantics(out, f"row {i}")
    return out


def _check_semantics(row: dict, where: str) -> None:
    """Cross-column rules: data rows carry version -1 and no log-probs; model rows a version >= 0."""
    if row["source"] == "data" and row["policy_version"] != DATA_POLICY_VERSION:
        raise ValueError(
            f"{where} column 'policy_version': source='data' rows must have {DATA_POLICY_VERSION}, "
            f"got {row['policy_version']}"
        )
    if row["source"] == "model" and row["policy_version"] < 0:
        raise ValueError(
            f"{where} column 'policy_version': model rows need a version >= 0, got {row['policy_version']}"
        )
    n_noise, n_act = len(row["is_noise"]), len(row["action_ids"])
    if n_noise not in (0, n_act):
        raise ValueError(
            f"{where} column 'is_noise': {n_noise} flags for {n_act} actions (need 0 or {n_act})"
        )
    if n_noise and row["source"] == "model":
        raise ValueError(f"{where} column 'is_noise': model rows have no injected noise; leave it empty")
    n_lp = len(row["logprobs"])
    if n_lp not in (0, n_act):
        raise ValueError(
            f"{where} column 'logprobs': {n_lp} log-probs for {n_act} actions (need 0 or {n_act})"
        )


def empty_batch() -> pa.RecordBatch:
    """A zero-row batch with `SCHEMA` (what `sample` returns when nothing is eligible)."""
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in SCHEMA], schema=SCHEMA)


def rows_to_batch(rows: list[dict]) -> pa.RecordBatch:
    """Validate `rows` (dicts keyed by column name) and build one `SCHEMA` record batch.

    `created_at` may be omitted (filled with the current UTC time); every other column is required.
    Raises ValueError naming the row index and column for a missing or ill-typed field, an unknown
    column, an unknown `source`/`finish_reason`, or a version that contradicts the source.
    """
    now = dt.datetime.now(dt.UTC)
    clean = [_check_row(r, i, now) for i, r in enumerate(rows)]
    if not clean:
        return empty_batch()
    arrays = []
    for f in SCHEMA:
        values = [r[f.name] for r in clean]
        if f.name == "source":
            idx = pa.array([SOURCES.index(v) for v in values], type=pa.int8())
            arrays.append(pa.DictionaryArray.from_arrays(idx, pa.array(SOURCES, type=pa.string())))
        else:
            arrays.append(pa.array(values, type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def check_version(found: object, where: str) -> None:
    """Raise a `UserError` (one line: the version found, the one needed, the fix) unless `found` (read
    from what `where` names: a buffer manifest) is `SCHEMA_VERSION`."""
    if found != SCHEMA_VERSION:
        from sm_dist.errors import UserError

        raise UserError(
            where, f"holds rows of Arrow schema version {found}; this sm-dist reads version {SCHEMA_VERSION} only.",
            "start a fresh run dir (another run.run_dir), or read it with the sm-dist that wrote it",
        )  # fmt: skip


def batch_to_rows(batch: pa.RecordBatch | pa.Table) -> list[dict]:
    """The inverse of `rows_to_batch`: one dict per row (`source` decoded to its string)."""
    return batch.to_pylist()


def validate_batch(batch: pa.RecordBatch) -> None:
    """Raise ValueError unless `batch` has exactly `SCHEMA`'s columns and types and valid values.

    Checked: column names/types (metadata aside), no nulls, `source` and `finish_reason` values,
    and the version rule (data rows -1, model rows >= 0). Row-level messages give the first bad index.
    """
    if not isinstance(batch, pa.RecordBatch):
        raise ValueError(
            f"expected a pyarrow.RecordBatch, got {type(batch).__name__}; build one with rows_to_batch"
        )
    if not batch.schema.equals(SCHEMA, check_metadata=False):
        raise ValueError(
            f"batch schema differs from SCHEMA (v{SCHEMA_VERSION}):\n{batch.schema}\nexpected:\n{SCHEMA}"
        )
    for name in COLUMNS:
        nulls = batch.column(name).null_count
        if nulls:
            raise ValueError(f"column {name!r} has {nulls} null(s); every column is required")
    _check_values(batch, "source", SOURCES)
    _check_values(batch, "finish_reason", FINISH_REASONS)
    src = batch.column("source").cast(pa.string())
    pv = batch.column("policy_version")
    bad = pc.or_(
        pc.and_(pc.equal(src, "data"), pc.not_equal(pv, DATA_POLICY_VERSION)),
        pc.and_(pc.equal(src, "model"), pc.less(pv, 0)),
    )
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise ValueError(
            f"row {i} column 'policy_version': {pv[i].as_py()} contradicts source={src[i].as_py()!r} "
            f"(data rows need {DATA_POLICY_VERSION}, model rows >= 0)"
        )


def _check_values(batch: pa.RecordBatch, name: str, allowed: Sequence[str]) -> None:
    col = batch.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(pa.string())
    ok = pc.is_in(col, value_set=pa.array(list(allowed), type=pa.string()))
    if batch.num_rows and not pc.all(ok).as_py():
        i = pc.index(ok, False).as_py()
        raise ValueError(f"row {i} column {name!r}: {col[i].as_py()!r} is not one of {list(allowed)}")
