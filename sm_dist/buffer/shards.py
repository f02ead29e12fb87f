"""The replay buffer split over `buffer.shards` actors: where each shard lives, which shard a rollout
worker writes to, and which shards each learner rank samples (issue 22).

Why: one `ReplayBuffer` actor serialises every `add` (segment write, fsync, rename, manifest) and every
sample; `benchmarks/buffer_throughput.py` measures what one sustains. With S shards there are S actors,
each an ordinary `ReplayBuffer` with its own folder, manifest and durability contract
(sm_dist/buffer/replay.py), so the writes spread over S processes.

Layout. S = 1 is the unsharded layout, `<run_dir>/buffer/` (runs written before sharding resume
unchanged). S > 1: shard k in `<run_dir>/buffer/shard-<k>/`. A run directory keeps the S it was written
with: `saved_shards` reads it off the disk, and a resume with another `buffer.shards` is refused (the
rows cannot be re-hashed without breaking each worker's FIFO). Each shard holds
`buffer.capacity_rows // S` rows and `buffer.capacity_bytes // S` bytes: the totals are the config's.

Writers. Rollout worker `w` writes only to shard `shard_of(w, S)`, a stable hash (blake2b) of its
worker id, so a worker's rows stay FIFO in one shard across restarts and scaling (names are never
reused). With few workers a hash can leave a shard with few writers or none: the sampler borrows (below).

Readers: the rule for which shard a learner rank samples (`plan_draws`). Each rank needs `q` rows a step
(the replay share over the ranks).
* S a multiple of the ranks R: rank r's *own* shards are r, r + R, r + 2R, ... (S/R of them); it
  samples them first, uniformly over their eligible rows together (the row counts per shard are drawn
  from the multivariate hypergeometric law over the shards' eligible counts, so the draw is the one a
  single buffer holding those shards' rows would make). A rank whose own shards hold fewer than `q`
  eligible rows takes the rest from the other shards' rows left over, so no rank waits while rows sit
  elsewhere.
* Otherwise (S not a multiple of R, S = 1 included) every rank samples all shards, in the same way.
Each shard answers one call a step (`ReplayBuffer.sample_and_count`: its rows and its eligible count;
`ReplayShards.draw`) and its rows are dealt out to the ranks, so no row reaches two ranks in one step. `buffer.newest_first` takes each shard's newest rows, in proportion to its eligible
rows (the newest overall would need a cross-shard merge by time). The staleness filter is the shard's own
(`ReplayBuffer.sample(min_version=...)`): unchanged.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

BUFFER_DIR, SHARD_PREFIX, MANIFEST = "buffer", "shard-", "manifest.json"
_SHARD_DIR = re.compile(r"shard-(\d+)")


# ---- layout ------------------------------------------------------------------------------------------


def buffer_dir(run_dir: str | Path, shard: int | None = None) -> Path:
    """The folder of shard `shard` (`<run_dir>/buffer/shard-<k>`), or of the unsharded buffer (None)."""
    root = Path(run_dir) / BUFFER_DIR
    return root if shard is None else root / f"{SHARD_PREFIX}{shard}"


def shard_dirs(run_dir: str | Path, shards: int) -> list[Path]:
    """The folders of a buffer of `shards` shards, in shard order (one, `<run_dir>/buffer`, when 1)."""
    return [buffer_dir(run_dir)] if shards == 1 else [buffer_dir(run_dir, k) for k in range(shards)]


def saved_shards(run_dir: str | Path) -> int | None:
    """How many shards the buffer on disk was written with: the `shard-<k>` folders under
    `<run_dir>/buffer` (their highest k + 1), 1 for an unsharded buffer's manifest, None when there is
    no buffer yet."""
    root = buffer_dir(run_dir)
    if not root.is_dir():
        return None
    ks = [int(m[1]) for p in root.iterdir() if p.is_dir() and (m := _SHARD_DIR.fullmatch(p.name))]
    if ks:
        return max(ks) + 1
    return 1 if (root / MANIFEST).exists() else None


def manifest_paths(run_dir: str | Path) -> dict[str, Path]:
    """Every shard's manifest on disk, by the name a checkpoint copies it under: `buffer_manifest.json`
    for an unsharded buffer, `buffer_manifest.shard-<k>.json` for shard k."""
    n = saved_shards(run_dir)
    if n is None:
        return {}
    if n == 1:
        return {"buffer_manifest.json": buffer_dir(run_dir) / MANIFEST}
    return {f"buffer_manifest.{SHARD_PREFIX}{k}.json": buffer_dir(run_dir, k) / MANIFEST for k in range(n)}


def shard_of(worker_id: str, shards: int) -> int:
    """The shard rollout worker `worker_id` writes to: blake2b of the id mod `shards` (Python's own
    `hash` is salted per process, so it would move a worker between shards on a restart)."""
    digest = hashlib.blake2b(worker_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


# ---- the sampling rule -------------------------------------------------------------------------------


def own_shards(rank: int, ranks: int, shards: int) -> list[int]:
    """The shards rank `rank` samples first: r, r + R, ... when `shards` is a multiple of `ranks`,
    else all of them (module docstring)."""
    if shards % ranks == 0:
        return list(range(rank, shards, ranks))
    return list(range(shards))


def _split(n: int, avail: list[int], rng: np.random.Generator, newest_first: bool) -> list[int]:
    """`n` rows over shards holding `avail` eligible rows (n <= sum): a uniform draw from their union
    (multivariate hypergeometric), or, for newest-first, in proportion (largest remainder)."""
    if n == 0 or sum(avail) == 0:
        return [0] * len(avail)
    if not newest_first:
        return [int(x) for x in rng.multivariate_hypergeometric(np.asarray(avail, dtype=np.int64), n)]
    exact = [n * a / sum(avail) for a in avail]
    out = [int(x) for x in exact]
    for i in sorted(range(len(avail)), key=lambda i: out[i] - exact[i])[: n - sum(out)]:
        out[i] += 1
    return out


def plan_draws(
    eligible: list[int], ranks: int, per_rank: int, rng: np.random.Generator, newest_first: bool = False
) -> list[list[int]]:
    """take[r][k]: the rows rank r draws from shard k this step, given each shard's `eligible` rows.

    Every rank gets the same count, `min(per_rank, sum(eligible) // ranks)`: first from its own shards
    (`own_shards`), then what it still lacks from the rows the others left (module docstring)."""
    shards = len(eligible)
    want = min(per_rank, sum(eligible) // ranks)
    left = list(eligible)
    take = [[0] * shards for _ in range(ranks)]

    def draw(r: int, group: list[int], n: int) -> None:
        got = _split(min(n, sum(left[k] for k in group)), [left[k] for k in group], rng, newest_first)
        for k, g in zip(group, got, strict=True):
            take[r][k] += g
            left[k] -= g

    for r in range(ranks):
        draw(r, own_shards(r, ranks, shards), want)
    for r in range(ranks):
        draw(r, list(range(shards)), want - sum(take[r]))
    return take


# ---- the driver's handle on the shards ---------------------------------------------------------------


class ReplayShards:
    """The replay buffer's S actors, as the driver uses them: the shard a worker writes to
    (`for_worker`), one step's rows for each learner rank (`draw`), merged `stats`, and which shard an
    actor-death error is about (`dead_shard`). `ray` is the module, or a fake with `get`."""

    def __init__(self, ray: Any, handles: list, dirs: list[Path], seed: int = 0):
        self.ray, self.handles, self.dirs = ray, list(handles), list(dirs)
        self._rng = np.random.default_rng(seed)  # the per-shard counts of a uniform draw

    def __len__(self) -> int:
        return len(self.handles)

    def for_worker(self, worker_id: str):
        """The shard actor rollout worker `worker_id` writes to."""
        return self.handles[shard_of(worker_id, len(self.handles))]

    def draw(self, ranks: int, n: int, min_version: int | None, newest_first: bool) -> list:
        """Up to `n // ranks` eligible rows for each rank (Arrow batches, rank order), by the rule of the
        module docstring; with one shard, one `sample` call dealt out row by row (r, r + R, ...).

        Several shards: one round of `sample_and_count` asks each shard for as many rows as it could
        have to give without borrowing (a rank's share `q` from an own shard; `q` x ranks when every rank
        samples every shard), and gets its eligible count with them; the plan then keeps the head of
        each shard's answer (a uniform random subset, or its newest rows). Only a shard that must lend
        more than it was asked for is asked again."""
        opts = {"min_version": min_version, "newest_first": newest_first}
        if len(self.handles) == 1:
            rows = self.ray.get(self.handles[0].sample.remote(n, **opts))
            rows = rows.slice(0, (rows.num_rows // ranks) * ranks)
            return [deal(rows, r, ranks) for r in range(ranks)]
        q, shards = n // ranks, len(self.handles)
        ask = q if shards % ranks == 0 else q * ranks
        answers = self.ray.get([h.sample_and_count.remote(ask, **opts) for h in self.handles])
        rows, eligible = [a[0] for a in answers], [a[1] for a in answers]
        take = plan_draws(eligible, ranks, q, self._rng, newest_first)
        per_shard = [sum(t[k] for t in take) for k in range(shards)]
        short = [k for k in range(shards) if per_shard[k] > rows[k].num_rows]  # lending beyond its answer
        again = self.ray.get([self.handles[k].sample.remote(per_shard[k], **opts) for k in short])
        for k, batch in zip(short, again, strict=True):
            rows[k] = batch
        return [concat(p) for p in _deal_plan(rows, take)]

    def stats(self, timeout: float | None = None) -> dict:
        """One shard's `ReplayBuffer.stats`, or, for several, their sums (newest version: the max) with
        each shard's own under `shards`."""
        per = self.ray.get([h.stats.remote() for h in self.handles], timeout=timeout)
        return per[0] if len(per) == 1 else merge_stats(per)

    def label(self, k: int) -> str:
        return f"ReplayBuffer shard {k} of {len(self.handles)} ({self.dirs[k]})"

    def dead_shard(self, err: BaseException) -> str | None:
        """The label of the shard whose actor `err` reports dead (its actor id in the error or its
        text, which a rollout worker's failed `add` carries), or None."""
        text = f"{getattr(err, 'actor_id', '')} {err}"
        for k, h in enumerate(self.handles):
            aid = h._actor_id.hex()  # as sm_dist.orchestrator.learners matches a dead rank
            if aid and aid in text:
                return self.label(k)
        return None


def _deal_plan(rows: list, take: list[list[int]]) -> list[list]:
    """Each rank's slices of the shards' answers, `take[r][k]` rows of shard k's, in rank order (fewer
    when a shard asked again answered with fewer: rows evicted in between)."""
    parts: list[list] = [[] for _ in take]
    for k, batch in enumerate(rows):
        at = 0
        for r, t in enumerate(take):
            if t[k]:
                parts[r].append(batch.slice(at, t[k]))
                at += t[k]
    return parts


def merge_stats(per: list[dict]) -> dict:
    """Several shards' `ReplayBuffer.stats` as one (sums; `newest_version` the max; `shards`: each)."""
    out = {
        k: sum(s[k] for s in per)
        for k in ("rows", "bytes", "segments", "added_rows", "evicted_rows", "lost_segments", "lost_rows")
    }
    out["rows_by_source"] = {
        src: sum(s["rows_by_source"].get(src, 0) for s in per) for src in per[0]["rows_by_source"]
    }
    versions = [s["newest_version"] for s in per if s["newest_version"] is not None]
    out["newest_version"] = max(versions) if versions else None
    out["shards"] = per
    return out


def deal(batch, r: int, ranks: int):
    """Rows r, r + ranks, r + 2·ranks, ... of an Arrow batch."""
    import pyarrow as pa

    return batch.take(pa.array(list(range(r, batch.num_rows, ranks)), type=pa.int64()))


def concat(parts: list):
    """Arrow batches of one schema as one batch (an empty `SCHEMA` batch for none)."""
    import pyarrow as pa

    from sm_dist.buffer.schema import empty_batch

    parts = [p for p in parts if p.num_rows]
    if not parts:
        return empty_batch()
    return parts[0] if len(parts) == 1 else pa.concat_batches(parts)
