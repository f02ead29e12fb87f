"""data.watch_dir (sm_dist/data/watch.py): a new file's rows reach the expert buffer, encoded like
data.train_path's; a file is taken once, also across a resume; a bad file is reported and skipped;
half-written names (.tmp, dotfiles) wait."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pytest

from sm_dist.config import Config
from sm_dist.data.watch import DataWatcher
from tests.unit.fakes import FakeActor, FakeRay, Method


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    cfg = Config(model={"dir": str(tiny_model_dir)})
    cfg.data.watch_dir = str(tmp_path / "incoming")
    cfg.data.max_prompt_len, cfg.data.max_answer_len = 48, 16
    added = []
    expert = FakeActor(add=Method(lambda batch: added.append(batch) or 0))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return cfg, tok, expert, added, run_dir


@pytest.fixture
def logged():
    """What the sm_dist loggers say (their own handler: setup_logging may stop propagation)."""
    import io

    buf, logger = io.StringIO(), logging.getLogger("sm_dist")
    h = logging.StreamHandler(buf)
    logger.addHandler(h)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield buf
    logger.removeHandler(h)
    logger.setLevel(old)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]


def test_a_new_file_is_added_once_also_after_a_resume(setup):
    cfg, tok, expert, added, run_dir = setup
    w = DataWatcher(cfg, tok, FakeRay(), expert, run_dir)
    assert w.poll(force=True) == 0  # the folder is created, empty
    (w.dir / "more.jsonl.tmp").write_text(jsonl(GOOD))  # being written: not read
    (w.dir / "more.jsonl").write_text(jsonl(GOOD))
    assert w.poll(force=True) == 5
    batch = pa.Table.from_batches([added[0]])
    assert batch.num_rows == 5 and set(batch.column("source").to_pylist()) == {"data"}
    assert all(s.startswith("watch0-") for s in batch.column("sample_id").to_pylist())
    assert w.poll(force=True) == 0 and len(added) == 1  # taken once
    again = DataWatcher(cfg, tok, FakeRay(), expert, run_dir)  # a resumed run reads the record
    assert again.poll(force=True) == 0 and len(added) == 1
    (w.dir / "later.jsonl").write_text(jsonl(GOOD[:2]))
    assert again.poll(force=True) == 2
    assert pa.Table.from_batches([added[1]]).column("sample_id").to_pylist()[0].startswith("watch1-")


def test_a_bad_file_is_reported_and_skipped_and_the_next_one_still_taken(setup, logged):
    cfg, tok, expert, added, run_dir = setup
    w = DataWatcher(cfg, tok, FakeRay(), expert, run_dir)
    (w.dir / "a-bad.jsonl").write_text("this is not json\n")
    (w.dir / "b-good.jsonl").write_text(jsonl(GOOD))
    assert w.poll(force=True) == 5
    assert "a-bad.jsonl skipped" in logged.getvalue() and len(added) == 1
    record = json.loads((run_dir / "watch_taken.json").read_text())
    assert record["a-bad.jsonl"]["rows"] == 0 and "error" in record["a-bad.jsonl"]
    assert record["b-good.jsonl"]["rows"] == 5


def test_with_on_bad_skip_the_bad_rows_are_counted_and_the_rest_added(setup, logged):
    cfg, tok, expert, added, run_dir = setup
    cfg.data.on_bad = "skip"
    w = DataWatcher(cfg, tok, FakeRay(), expert, run_dir)
    (w.dir / "mixed.jsonl").write_text(jsonl(GOOD[:3]) + "{broken\n" + jsonl([{"prompt": "x"}]))
    assert w.poll(force=True) == 3
    assert "skipped 2" in logged.getvalue(), logged.getvalue()
