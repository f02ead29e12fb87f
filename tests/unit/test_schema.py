"""The Arrow rollout schema: round trips, validation errors that name row and column, IPC persistence."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sm_dist.buffer.schema import (
    SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    batch_to_rows,
    empty_batch,
    rows_to_batch,
    validate_batch,
)

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def model_row(i: int = 0, **over) -> dict:
    row = {
        "sample_id": f"w0-{i}",
        "prompt_ids": [1, 2, 3],
        "action_ids": [7, 8, 4, 9, 2],
        "final_ids": [7, 9, 2],
        "source": "model",
        "policy_version": 5,
        "logprobs": [-0.5, -1.0, -2.0, -0.25, -0.125],
        "finish_reason": "eos",
        "worker_id": "w0",
        "created_at": T0,
        "is_noise": [],
    }
    return row | over


def data_row(i: int = 0, **over) -> dict:
    return (
        model_row(i, sample_id=f"d-{i}", source="data", policy_version=-1, logprobs=[], worker_id="data")
        | over
    )


def test_schema_has_the_design_columns_and_version():
    assert SCHEMA.names == [
        "sample_id", "prompt_ids", "action_ids", "final_ids", "source", "policy_version",
        "logprobs", "finish_reason", "worker_id", "created_at", "is_noise",
    ]  # fmt: skip
    assert SCHEMA.field("source").type == pa.dictionary(pa.int8(), pa.string())
    assert SCHEMA.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert SCHEMA.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()


def test_round_trip_rows_batch_rows():
    rows = [model_row(0), data_row(1), model_row(2, finish_reason="action_cap", logprobs=[])]
    batch = rows_to_batch(rows)
    validate_batch(batch)
    assert batch.schema.equals(SCHEMA, check_metadata=True)
    assert batch_to_rows(batch) == rows


def test_created_at_defaults_to_now_utc():
    row = model_row()
    del row["created_at"]
    (out,) = batch_to_rows(rows_to_batch([row]))
    assert abs(out["created_at"] - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)


def test_round_trip_through_ipc_file(tmp_path):
    batch = rows_to_batch([model_row(i) for i in range(3)] + [data_row(9)])
    path = tmp_path / "seg.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as w:
        w.write_batch(batch)
    table = pa.ipc.open_file(str(path)).read_all()
    assert table.schema.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    assert table.to_pylist() == batch_to_rows(batch)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"finish_reason": "stop"}, r"row 1 column 'finish_reason': 'stop' is not one of"),
        ({"source": "human"}, r"row 1 column 'source': 'human' is not one of \['data', 'model'\]"),
        ({"prompt_ids": [1, "2"]}, r"row 1 column 'prompt_ids'\[1\]: expected an int32 token id, got '2'"),
        ({"action_ids": [2**31]}, r"row 1 column 'action_ids'\[0\]"),
        ({"final_ids": (True,)}, r"row 1 column 'final_ids'\[0\]"),
        ({"final_ids": "123"}, r"row 1 column 'final_ids': expected a list"),
        ({"policy_version": 1.0}, r"row 1 column 'policy_version': expected an int"),
        ({"policy_version": -1}, r"row 1 column 'policy_version': model rows need a version >= 0"),
        ({"logprobs": [0.0]}, r"row 1 column 'logprobs': 1 log-probs for 5 actions"),
        ({"logprobs": [float("nan")] * 5}, r"row 1 column 'logprobs'\[0\]"),
        ({"sample_id": None}, r"row 1 column 'sample_id': expected a string"),
        ({"created_at": dt.datetime(2026, 1, 1)}, r"row 1 column 'created_at': expected a timezone-aware"),
        ({"typo": 1}, r"row 1: unknown column\(s\) \['typo'\]"),
    ],
)
def test_rows_to_batch_names_row_and_column(over, message):
    with pytest.raises(ValueError, match=message):
        rows_to_batch([model_row(0), model_row(1, **over)])


def test_missing_column_and_data_version_rule():
    row = model_row()
    del row["worker_id"]
    with pytest.raises(ValueError, match=r"row 0: missing column\(s\) \['worker_id'\]"):
        rows_to_batch([row])
    with pytest.raises(
        ValueError, match=r"row 0 column 'policy_version': source='data' rows must have -1, got 3"
    ):
        rows_to_batch([data_row(policy_version=3)])


def test_validate_batch_rejects_foreign_schemas_and_values():
    with pytest.raises(ValueError, match="build one with rows_to_batch"):
        validate_batch(pa.table({"a": [1]}))
    with pytest.raises(ValueError, match="batch schema differs from SCHEMA"):
        validate_batch(rows_to_batch([model_row()]).drop_columns(["logprobs"]))
    good = rows_to_batch([model_row(0), model_row(1)])
    bad_reason = good.set_column(7, SCHEMA.field("finish_reason"), pa.array(["eos", "stop"]))
    with pytest.raises(ValueError, match=r"row 1 column 'finish_reason': 'stop'"):
        validate_batch(bad_reason)
    bad_version = good.set_column(5, SCHEMA.field("policy_version"), pa.array([3, -4], pa.int64()))
    with pytest.raises(ValueError, match=r"row 1 column 'policy_version': -4 contradicts source='model'"):
        validate_batch(bad_version)


def test_empty_batch_is_valid():
    validate_batch(empty_batch())
    assert rows_to_batch([]).num_rows == 0 and batch_to_rows(empty_batch()) == []


_ids = st.lists(st.integers(0, 2**31 - 1), max_size=8)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(_ids, _ids, st.booleans(), st.sampled_from(["eos", "length", "action_cap"])), max_size=6
    )
)
def test_round_trip_property(specs):
    rows = []
    for i, (prompt, actions, is_data, reason) in enumerate(specs):
        make = data_row if is_data else model_row
        rows.append(
            make(
                i, prompt_ids=prompt, action_ids=actions, final_ids=actions, logprobs=[], finish_reason=reason
            )
        )
    assert batch_to_rows(rows_to_batch(rows)) == rows


def test_is_noise_travels_with_data_rows_and_is_checked():
    flags = [True, False, False, False, False]
    (out,) = batch_to_rows(rows_to_batch([data_row(0, is_noise=flags)]))
    assert out["is_noise"] == flags
    row = model_row()
    del row["is_noise"]
    assert batch_to_rows(rows_to_batch([row]))[0]["is_noise"] == []  # optional: no flags
    with pytest.raises(ValueError, match=r"row 0 column 'is_noise': 2 flags for 5 actions"):
        rows_to_batch([data_row(0, is_noise=[True, False])])
    with pytest.raises(ValueError, match="model rows have no injected noise"):
        rows_to_batch([model_row(0, is_noise=flags)])
    with pytest.raises(ValueError, match="list of bools"):
        rows_to_batch([data_row(0, is_noise=[1, 0, 0, 0, 0])])


def test_a_buffer_of_an_older_schema_version_is_refused_in_one_line(tmp_path):
    """No conversion: a run dir whose buffer manifest records another version stops the buffer (and a
    plain read) with the version found, the one needed and the fix."""
    import json

    from sm_dist.buffer.replay import ReplayBuffer, read_run_buffer
    from sm_dist.errors import UserError

    ReplayBuffer(str(tmp_path), 100, 1 << 20, 0).add(rows_to_batch([model_row(0)]))
    manifest = tmp_path / "buffer" / "manifest.json"
    doc = json.loads(manifest.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION == 3
    manifest.write_text(json.dumps({**doc, "schema_version": 2}))
    line = r"holds rows of Arrow schema version 2; this sm-dist reads version 3 only\. Fix: start a fresh run dir"
    with pytest.raises(UserError, match=line):
        ReplayBuffer(str(tmp_path), 100, 1 << 20, 0)
    with pytest.raises(UserError, match=line):
        read_run_buffer(tmp_path)
