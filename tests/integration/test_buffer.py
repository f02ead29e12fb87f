"""ReplayBuffer as a Ray actor: FIFO eviction, staleness, concurrent writers, kill -9 restore, full disk,
and two shards (buffer.shards=2) as the driver builds them."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from sm_dist.buffer import ReplayBuffer, read_run_buffer, rows_to_batch
from sm_dist.buffer.replay import MANIFEST

BIG = 10**12  # "no eviction" capacity
ROOT = Path(__file__).resolve().parents[2]


def make_batch(prefix: str, start: int, n: int, version: int = 0, source: str = "model") -> pa.RecordBatch:
    """`n` rows with sample_ids f"{prefix}-{start + i}" (5 actions each)."""
    return rows_to_batch(
        [
            {
                "sample_id": f"{prefix}-{start + i}",
                "prompt_ids": [1, 2, 3],
                "action_ids": [4, 5, 6, 7, 2],
                "final_ids": [4, 5, 6, 7, 2],
                "source": source,
                "policy_version": version if source == "model" else -1,
                "logprobs": [-1.0] * 5 if source == "model" else [],
                "finish_reason": "eos",
                "worker_id": prefix,
            }
            for i in range(n)
        ]
    )


def ids(table) -> list[str]:
    return table.column("sample_id").to_pylist()


def buffer_actor(ray, run_dir, capacity_rows=BIG, capacity_bytes=BIG, seed=0):
    return (
        ray.remote(ReplayBuffer)
        .options(num_cpus=0.25)
        .remote(str(run_dir), capacity_rows, capacity_bytes, seed)
    )


def test_fifo_eviction_by_rows_persists_and_restores(ray_cluster, tmp_path):
    ray = ray_cluster
    buf = buffer_actor(ray, tmp_path, capacity_rows=25)
    totals = [ray.get(buf.add.remote(make_batch("w", 10 * j, 10))) for j in range(4)]
    assert totals == [10, 20, 30, 40]
    kept = ids(ray.get(buf.read_all.remote()))
    assert kept == [f"w-{i}" for i in range(15, 40)]  # oldest 15 evicted, incl. half of the 2nd batch
    stats = ray.get(buf.stats.remote())
    assert (stats["rows"], stats["evicted_rows"], stats["added_rows"], stats["segments"]) == (25, 15, 40, 3)
    files = sorted(p.name for p in (tmp_path / "buffer").iterdir())
    assert files == [MANIFEST, "seg-000000000001.arrow", "seg-000000000002.arrow", "seg-000000000003.arrow"]
    assert ids(read_run_buffer(tmp_path)) == kept
    ray.kill(buf)
    again = buffer_actor(ray, tmp_path, capacity_rows=25)
    assert ids(ray.get(again.read_all.remote())) == kept
    assert ray.get(again.add.remote(make_batch("w", 40, 5))) == 45
    assert ids(ray.get(again.read_all.remote())) == [f"w-{i}" for i in range(20, 45)]


def test_fifo_eviction_by_bytes(ray_cluster, tmp_path):
    ray = ray_cluster
    one = make_batch("b", 0, 10)
    buf = buffer_actor(ray, tmp_path, capacity_bytes=3 * one.nbytes)
    for j in range(6):
        ray.get(buf.add.remote(make_batch("b", 10 * j, 10)))
    stats = ray.get(buf.stats.remote())
    assert stats["bytes"] <= 3 * one.nbytes and stats["rows"] >= 29  # within a row of the byte cap
    assert ids(ray.get(buf.read_all.remote())) == [f"b-{i}" for i in range(60 - stats["rows"], 60)]
    assert stats["evicted_rows"] == 60 - stats["rows"]
    assert len(list((tmp_path / "buffer").glob("seg-*.arrow"))) == stats["segments"]


def test_staleness_filter_newest_first_and_uniform(ray_cluster, tmp_path):
    ray = ray_cluster
    buf = buffer_actor(ray, tmp_path, seed=1)
    for v in range(4):
        ray.get(buf.add.remote(make_batch(f"v{v}", 0, 10, version=v)))
    ray.get(buf.add.remote(make_batch("d", 0, 10, source="data")))
    fresh = ray.get(buf.sample.remote(1000, min_version=2))
    assert fresh.num_rows == 30  # 20 model rows with version >= 2, plus all 10 data rows (never stale)
    assert sorted(set(fresh.column("policy_version").to_pylist())) == [-1, 2, 3]
    newest = ray.get(buf.sample.remote(12, newest_first=True))
    assert ids(newest) == [f"d-{i}" for i in range(9, -1, -1)] + ["v3-9", "v3-8"]
    draws = [ids(ray.get(buf.sample.remote(8))) for _ in range(20)]
    assert all(len(set(d)) == 8 for d in draws)  # without replacement
    assert len({i for d in draws for i in d}) > 30  # spread over the buffer, not a fixed window
    assert ray.get(buf.sample.remote(5, min_version=99)).num_rows == 5  # only data rows remain eligible
    stats = ray.get(buf.stats.remote())
    assert stats["rows_by_source"] == {"data": 10, "model": 40} and stats["newest_version"] == 3


@pytest.mark.slow
def test_two_writers_and_a_reader_lose_and_duplicate_nothing(ray_cluster, tmp_path):
    ray = ray_cluster

    @ray.remote(num_cpus=0.25)
    class Writer:
        """Adds `batches` batches of uniquely-named rows; returns every acknowledged id."""

        def __init__(self, name: str, buffer):
            self.name, self.buffer = name, buffer

        def run(self, batches: int, rows_per_batch: int) -> list[str]:
            acked = []
            for k in range(batches):
                batch = make_batch(self.name, k * rows_per_batch, rows_per_batch)
                ray.get(self.buffer.add.remote(batch))
                acked += ids(batch)
            return acked

    # pytest imports this file as a top-level module the Ray workers cannot import: ship Writer (and the
    # helpers it calls) by value instead of by reference.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    buf = buffer_actor(ray, tmp_path)
    writers = [Writer.remote(f"writer{k}", buf) for k in range(2)]
    pending = [w.run.remote(150, 7 + k) for k, w in enumerate(writers)]
    during = 0  # samples taken while rows were still arriving (counted, not timed)
    while True:
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=0.05)
        sample = ray.get(buf.sample.remote(16))
        assert len(set(ids(sample))) == sample.num_rows
        if len(done) == len(pending):
            break
        during += ray.get(buf.stats.remote())["rows"] < 150 * (7 + 8)
    acked = [i for ref in pending for i in ray.get(ref)]
    held = ids(ray.get(buf.read_all.remote()))
    assert len(acked) == 150 * (7 + 8) and during >= 1
    assert len(held) == len(set(held)), "duplicated rows"
    assert set(held) == set(acked), (
        f"lost {len(set(acked) - set(held))}, unexpected {len(set(held) - set(acked))}"
    )
    assert sorted(ids(read_run_buffer(tmp_path))) == sorted(held)


def test_kill_9_restores_every_acknowledged_row(ray_cluster, tmp_path):
    ray = ray_cluster
    buf = buffer_actor(ray, tmp_path)
    acked = []
    for j in range(8):
        batch = make_batch("k", 10 * j, 10, version=j)
        ray.get(buf.add.remote(batch))
        acked += ids(batch)
    pid = ray.get(buf.stats.remote())["pid"]
    in_flight = buf.add.remote(make_batch("late", 0, 10))  # may or may not land before the kill
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(buf.stats.remote(), timeout=60)
    del in_flight
    restored = buffer_actor(ray, tmp_path)
    held = ids(ray.get(restored.read_all.remote()))
    assert len(held) == len(set(held))
    assert set(acked) <= set(held) and set(held) - set(acked) <= {f"late-{i}" for i in range(10)}
    assert not list((tmp_path / "buffer").glob("*.tmp"))
    table = read_run_buffer(tmp_path)  # plain pyarrow, no actor
    assert ids(table) == held and table.column("policy_version").to_pylist()[:10] == [0] * 10
    first = sorted((tmp_path / "buffer").glob("seg-*.arrow"))[0]
    assert ids(pa.ipc.open_file(str(first)).read_all()) == [f"k-{i}" for i in range(10)]


def test_missing_and_corrupt_segments_are_counted_and_logged(tmp_path, caplog):
    buf = ReplayBuffer(str(tmp_path), BIG, BIG)
    for j in range(3):
        buf.add(make_batch("c", 10 * j, 10))
    segs = sorted((tmp_path / "buffer").glob("seg-*.arrow"))
    segs[0].unlink()
    segs[1].write_bytes(b"not arrow")
    (tmp_path / "buffer" / "seg-000000000099.arrow.tmp").write_bytes(b"half written")
    with caplog.at_level(logging.WARNING, logger="sm_dist.buffer.replay"):
        again = ReplayBuffer(str(tmp_path), BIG, BIG)
    stats = again.stats()
    assert (stats["lost_segments"], stats["lost_rows"], stats["rows"]) == (2, 20, 10)
    assert sum("missing or corrupt" in r.message for r in caplog.records) == 2
    assert ids(again.read_all()) == [f"c-{i}" for i in range(20, 30)]
    assert sorted(p.name for p in (tmp_path / "buffer").iterdir()) == [MANIFEST, segs[2].name]
    assert json.loads((tmp_path / "buffer" / MANIFEST).read_text())["segments"][0]["file"] == segs[2].name


def test_full_disk_raises_naming_the_path_and_keeps_the_manifest(tmp_path, monkeypatch):
    buf = ReplayBuffer(str(tmp_path), BIG, BIG)
    buf.add(make_batch("f", 0, 10))
    manifest = (tmp_path / "buffer" / MANIFEST).read_text()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=r"could not write .*seg-000000000001\.arrow .*Free disk space") as info:
        buf.add(make_batch("f", 10, 10))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert (tmp_path / "buffer" / MANIFEST).read_text() == manifest
    assert sorted(p.name for p in (tmp_path / "buffer").iterdir()) == [MANIFEST, "seg-000000000000.arrow"]
    assert buf.stats()["rows"] == 10 and buf.stats()["added_rows"] == 10
    assert buf.add(make_batch("f", 10, 10)) == 20
    assert ids(read_run_buffer(tmp_path)) == [f"f-{i}" for i in range(20)]


def test_manifest_write_failure_rolls_back_the_segment(tmp_path, monkeypatch):
    import sm_dist.buffer.replay as replay

    buf = ReplayBuffer(str(tmp_path), BIG, BIG)
    real = replay._write_atomic

    def fail_manifest(path, write):
        if path.name == MANIFEST:
            raise OSError(errno.ENOSPC, f"replay buffer could not write {path}")
        real(path, write)

    monkeypatch.setattr(replay, "_write_atomic", fail_manifest)
    with pytest.raises(OSError, match="manifest.json"):
        buf.add(make_batch("m", 0, 10))
    monkeypatch.undo()
    assert buf.stats()["rows"] == 0 and not list((tmp_path / "buffer").glob("seg-*"))


def test_invalid_batch_is_rejected_before_anything_is_written(tmp_path):
    buf = ReplayBuffer(str(tmp_path), BIG, BIG)
    with pytest.raises(ValueError, match="schema differs"):
        buf.add(make_batch("x", 0, 3).drop_columns(["logprobs"]))
    with pytest.raises(ValueError, match="capacity_rows=0"):
        ReplayBuffer(None, 0, BIG)
    assert not list((tmp_path / "buffer").iterdir())


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "buffer").mkdir()
    (tmp_path / "buffer" / MANIFEST).write_text("{ not json")
    with pytest.raises(
        ValueError, match=r"manifest .*manifest\.json is unreadable.*move the buffer dir aside"
    ):
        ReplayBuffer(str(tmp_path), BIG, BIG)
    with pytest.raises(ValueError, match="is unreadable"):
        read_run_buffer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no replay-buffer manifest"):
        read_run_buffer(tmp_path / "elsewhere")


def test_two_shards_route_by_worker_sample_per_rank_and_name_a_dead_shard(ray_cluster, tmp_path):
    """`buffer.shards=2` as the driver builds it (sm_dist.orchestrator.actors.build_replay): each worker's rows in the
    shard its id hashes to, each of 2 ranks sampling its own shard (staleness filter per shard), merged
    stats, a dead shard named with its folder, and a rebuild that restores both shards."""
    from sm_dist.buffer.shards import shard_of
    from sm_dist.config import load_config
    from sm_dist.orchestrator.actors import build_replay

    ray = ray_cluster
    over = [f"run.run_dir={tmp_path}", "buffer.shards=2", "learner.num_learners=2", "learner.batch_size=8"]
    cfg = load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), over)
    replay = build_replay(ray, cfg)
    workers = [f"w{i}" for i in range(6)]
    for v in range(3):
        ray.get([replay.for_worker(w).add.remote(make_batch(w, 10 * v, 10, version=v)) for w in workers])
    home = {k: {w for w in workers if shard_of(w, 2) == k} for k in (0, 1)}
    assert home[0] and home[1], home
    for k in (0, 1):  # every row in its worker's shard, each worker's rows in order (FIFO per worker)
        rows = read_run_buffer(tmp_path, shard=k).to_pylist()
        assert {r["worker_id"] for r in rows} == home[k]
        for w in home[k]:
            assert [r["sample_id"] for r in rows if r["worker_id"] == w] == [f"{w}-{i}" for i in range(30)]
    per_rank = replay.draw(2, 16, min_version=1, newest_first=False)
    assert [b.num_rows for b in per_rank] == [8, 8]
    for r, b in enumerate(per_rank):  # rank r's own shard holds plenty: nothing borrowed
        assert set(b.column("worker_id").to_pylist()) <= home[r]
        assert min(b.column("policy_version").to_pylist()) >= 1
    assert not set(ids(per_rank[0])) & set(ids(per_rank[1]))
    # only version-2 rows eligible: 10 per worker, so the shard with fewer workers' rank borrows the rest
    small = min((0, 1), key=lambda k: len(home[k]))
    need = 10 * len(workers) // 2
    per_rank = replay.draw(2, 2 * need, min_version=2, newest_first=False)
    assert [b.num_rows for b in per_rank] == [need, need]
    mine = per_rank[small].column("worker_id").to_pylist()
    assert sum(w in home[small] for w in mine) == 10 * len(home[small])  # all its own eligible rows first
    assert len(set(ids(per_rank[0])) | set(ids(per_rank[1]))) == 2 * need  # no row twice
    assert {v for b in per_rank for v in b.column("policy_version").to_pylist()} == {2}
    stats = replay.stats()
    assert stats["added_rows"] == stats["rows"] == 180 and len(stats["shards"]) == 2
    assert stats["shards"][0]["rows"] == 30 * len(home[0])
    assert stats["shards"][0]["pid"] != stats["shards"][1]["pid"]  # two actor processes
    ray.kill(replay.handles[1], no_restart=True)
    for _ in range(200):  # the kill is asynchronous: a call right after it may still be answered
        try:
            ray.get(replay.handles[1].stats.remote(), timeout=30)
            time.sleep(0.05)
        except ray.exceptions.RayActorError:
            break
    with pytest.raises(ray.exceptions.RayActorError) as died:
        replay.draw(2, 16, min_version=1, newest_first=False)
    assert replay.dead_shard(died.value) == f"ReplayBuffer shard 1 of 2 ({tmp_path / 'buffer' / 'shard-1'})"
    again = build_replay(ray, cfg)  # a resume: every shard restores its own folder
    assert [s["rows"] for s in again.stats()["shards"]] == [30 * len(home[0]), 30 * len(home[1])]
