"""The sharded replay buffer's rules (sm_dist/buffer/shards.py) on real Arrow files, no Ray: which
shard a worker writes to, which shards a rank samples, the layout on disk, and a 2-shard restart
after a crash (a half-written segment left in one shard)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sm_dist.buffer import ReplayBuffer, read_run_buffer, rows_to_batch
from sm_dist.buffer.shards import (
    buffer_dir,
    manifest_paths,
    merge_stats,
    own_shards,
    plan_draws,
    saved_shards,
    shard_dirs,
    shard_of,
)

BIG = 10**12


def batch(worker: str, start: int, n: int, version: int = 0):
    return rows_to_batch(
        [
            {
                "sample_id": f"{worker}-{start + i}", "prompt_ids": [1, 2], "action_ids": [3, 2],
                "final_ids": [3, 2], "source": "model", "policy_version": version, "logprobs": [-1.0, -1.0],
                "finish_reason": "eos", "worker_id": worker,
            }
            for i in range(n)
        ]
    )  # fmt: skip


def test_a_worker_always_writes_to_the_same_shard_and_many_workers_spread():
    names = [f"w{i}" for i in range(256)]
    first = [shard_of(n, 4) for n in names]
    assert first == [shard_of(n, 4) for n in names]  # stable: a pure function of the id (no salted hash)
    assert all(shard_of(n, 1) == 0 for n in names)
    counts = np.bincount(first, minlength=4)
    assert counts.min() >= 40, counts  # 64 expected per shard
    assert {shard_of("w0", 2), shard_of("w1", 2)} == {0, 1}  # the two workers of the tiny config split


def test_own_shards_when_the_ranks_divide_the_shards_else_all():
    assert [own_shards(r, 2, 4) for r in range(2)] == [[0, 2], [1, 3]]
    assert [own_shards(r, 2, 2) for r in range(2)] == [[0], [1]]
    assert own_shards(0, 1, 3) == [0, 1, 2]
    assert own_shards(1, 2, 3) == [0, 1, 2]  # 3 shards over 2 ranks: every rank samples all of them


def test_plan_takes_each_ranks_rows_from_its_own_shards_when_they_hold_enough():
    rng = np.random.default_rng(0)
    take = plan_draws([50, 40, 30, 60], ranks=2, per_rank=8, rng=rng)
    assert [sum(t) for t in take] == [8, 8]
    assert take[0][1] == take[0][3] == 0 and take[1][0] == take[1][2] == 0  # own shards only


def test_plan_borrows_what_a_rank_lacks_and_never_overdraws_a_shard():
    rng = np.random.default_rng(0)
    take = plan_draws([1, 30], ranks=2, per_rank=8, rng=rng)  # rank 0's shard has 1 row
    assert take == [[1, 7], [0, 8]]
    take = plan_draws([0, 5], ranks=2, per_rank=8, rng=rng)  # 5 rows: 2 for each rank, equal counts
    assert [sum(t) for t in take] == [2, 2] and take[0][0] == 0
    for _ in range(200):  # any counts: equal per rank, within each shard's rows, as many as can be
        elig = list(rng.integers(0, 12, size=int(rng.integers(1, 6))))
        ranks = int(rng.integers(1, 4))
        take = plan_draws(elig, ranks, 6, rng, newest_first=bool(rng.integers(2)))
        per_shard = [sum(t[k] for t in take) for k in range(len(elig))]
        assert all(0 <= p <= e for p, e in zip(per_shard, elig, strict=True))
        assert {sum(t) for t in take} == {min(6, sum(elig) // ranks)}


def test_a_uniform_plan_follows_the_eligible_counts():
    rng = np.random.default_rng(1)
    drawn = np.zeros(3)
    for _ in range(2000):  # 3 shards over 2 ranks: both ranks sample all three
        drawn += np.sum(plan_draws([100, 300, 600], ranks=2, per_rank=5, rng=rng), axis=0)
    assert np.allclose(drawn / drawn.sum(), [0.1, 0.3, 0.6], atol=0.01), drawn / drawn.sum()
    assert plan_draws([10, 30], 1, 8, rng, newest_first=True) == [[2, 6]]  # in proportion


def test_layout_one_shard_is_the_old_folder(tmp_path):
    assert shard_dirs(tmp_path, 1) == [tmp_path / "buffer"]
    assert shard_dirs(tmp_path, 2) == [tmp_path / "buffer" / "shard-0", tmp_path / "buffer" / "shard-1"]
    assert saved_shards(tmp_path) is None and manifest_paths(tmp_path) == {}
    ReplayBuffer(str(tmp_path), BIG, BIG).add(batch("w0", 0, 3))
    assert saved_shards(tmp_path) == 1
    assert manifest_paths(tmp_path) == {"buffer_manifest.json": tmp_path / "buffer" / "manifest.json"}


def test_two_shards_restore_after_a_crash_with_a_tmp_left_in_one(tmp_path):
    a, b = (ReplayBuffer(str(tmp_path), BIG, BIG, shard=k) for k in (0, 1))
    for j in range(3):
        a.add(batch("w0", 10 * j, 10, version=j))
        b.add(batch("w1", 10 * j, 5, version=j))
    assert saved_shards(tmp_path) == 2
    assert sorted(manifest_paths(tmp_path)) == [
        "buffer_manifest.shard-0.json",
        "buffer_manifest.shard-1.json",
    ]
    # a crash during shard 1's next add: its segment half-written, the manifest never updated
    half = buffer_dir(tmp_path, 1) / "seg-000000000003.arrow.tmp"
    half.write_bytes(b"half written")
    del a, b
    a2, b2 = (ReplayBuffer(str(tmp_path), BIG, BIG, shard=k) for k in (0, 1))
    assert not half.exists()  # unacknowledged: removed at the restart
    assert a2.read_all().column("sample_id").to_pylist() == [f"w0-{i}" for i in range(30)]
    assert b2.read_all().column("sample_id").to_pylist() == [f"w1-{i}" for i in range(25) if i % 10 < 5]
    assert (a2.stats()["added_rows"], b2.stats()["added_rows"]) == (30, 15)
    assert (
        b2.add(batch("w1", 30, 5, version=3)) == 20
    )  # the shard goes on where it stood (seq 3 reused, not lost)
    table = read_run_buffer(tmp_path)  # every shard, shard by shard, no actor
    assert table.num_rows == 50 and table.column("sample_id").to_pylist()[:30] == [
        f"w0-{i}" for i in range(30)
    ]
    assert read_run_buffer(tmp_path, shard=1).num_rows == 20
    rows, eligible = b2.sample_and_count(4, min_version=2)  # the staleness filter, per shard
    assert (rows.num_rows, eligible, a2.sample_and_count(0)[1]) == (4, 10, 30)
    assert min(rows.column("policy_version").to_pylist()) >= 2
    with pytest.raises(ValueError, match="has 2 shard"):
        read_run_buffer(tmp_path, shard=2)
    doc = json.loads((buffer_dir(tmp_path, 1) / "manifest.json").read_text())
    assert [s["file"] for s in doc["segments"]][-1] == "seg-000000000003.arrow"


def test_merged_stats_sum_the_shards():
    one = {"rows": 3, "bytes": 10, "segments": 1, "added_rows": 5, "evicted_rows": 2, "lost_segments": 0,
           "lost_rows": 0, "rows_by_source": {"data": 0, "model": 3}, "newest_version": 4, "pid": 1}  # fmt: skip
    two = {**one, "rows": 4, "newest_version": None, "rows_by_source": {"data": 1, "model": 3}, "pid": 2}
    m = merge_stats([one, two])
    assert (m["rows"], m["added_rows"], m["newest_version"]) == (7, 10, 4)
    assert m["rows_by_source"] == {"data": 1, "model": 6} and [s["pid"] for s in m["shards"]] == [1, 2]
