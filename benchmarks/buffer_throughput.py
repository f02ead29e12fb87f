"""Rows per second that the replay buffer (1 or more shards) and the driver's sampling loop sustain, and
how many rollout workers that feeds.

Real paths only: the buffer is `sm_dist.orchestrator.actors.build_replay` (`buffer.shards` actors of
`ray.remote(num_cpus=0)(ReplayBuffer)`) on a run directory (every `add` writes an Arrow IPC segment, fsyncs,
renames and rewrites its shard's manifest before it acknowledges); `--writers` Ray actor processes, named
w0, w1, ... like rollout workers, each call `add` on the shard their name hashes to
(`ReplayShards.for_worker`) with `--rows-per-add` rollout rows (the rollout worker's
`ray.get(buffer.add.remote(batch))`), as fast as acknowledgements come back; meanwhile the driver runs
`sm_dist.orchestrator.sampler.BatchSampler.sample` (replay shards + expert buffer, staleness filter, each of `--ranks`
ranks drawing from its own shards) in a loop, as the learner loop does between steps. Rows are
arithmetic-sized (prompt 30, 14 actions) unless `--actions` says otherwise; what a row costs the buffer
grows with its length.

Each shard count of `--shards` (default 1 and 2) runs `--repeats` times, interleaved (1, 2, 1, 2, ...), each
on a fresh run directory, in one Ray session: figures are medians, ratios between medians of this run.
Printed per shard count: acknowledged rows/s (the sustained write rate while the buffer also serves
samples), add latency, the driver's sampled batches/s and rows/s, and the workers-fed estimate: buffer
rows/s over one GPU engine's rows/s, where an engine's rows/s = its output tokens/s / tokens per row.
Engine figures (`--engine-tok-s-8b`, `--engine-tok-s-1b`):

* 8B: 12,500 output tok/s, Llama 3.1 8B BF16 on 1x H100 80GB (vLLM, FlashInfer, 0.8 GPU memory
  utilisation), as collected on https://www.morphllm.com/vllm-benchmarks from third-party runs. vLLM's
  own v0.6.0 post (blog.vllm.ai/2024/09/05/perf-update.html, Llama 3 8B on 1x H100, ShareGPT) reports
  the 2.7x gain over v0.5.3 in relative terms, which is why the absolute number comes from that page.
* 1B: no published vLLM figure was found here; 4x the 8B figure (50,000 tok/s) is an assumption
  (decoding is memory-bound and a 1B model reads ~1/6 of the weights, less the CPU-side scheduling that
  then dominates). Override both with measured numbers when a GPU is lent.

Last line: `buffer_rows_per_s: X`, the best shard count's median (named on the line above it). Figures
measured on the development machine, and how to read them: docs/learner_scaling.md ("Replay buffer shards").
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import threading
import time
from types import SimpleNamespace


def rollout_rows(n: int, actions: int, seed: int, worker: str) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        acts = [rng.randrange(30) for _ in range(actions)]
        rows.append({
            "sample_id": f"{worker}-{seed}-{i}", "prompt_ids": [rng.randrange(30) for _ in range(30)],
            "action_ids": acts, "final_ids": acts, "source": "model", "policy_version": 0,
            "logprobs": [-0.5] * actions, "finish_reason": "eos", "worker_id": worker, "is_noise": [],
        })  # fmt: skip
    return rows


class Writer:
    """One rollout worker's write path: `add` a ready batch, wait for the acknowledgement, again."""

    def __init__(self, buffer, rows_per_add: int, actions: int, name: str, seed: int):
        from sm_dist.buffer.schema import rows_to_batch

        self.buffer = buffer
        self.batch = rows_to_batch(rollout_rows(rows_per_add, actions, seed, name))

    def run(self, seconds: float) -> list[float]:
        import ray

        lat, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            ray.get(self.buffer.add.remote(self.batch))
            lat.append(time.perf_counter() - t0)
        return lat


def driver_loop(sampler, ranks: int, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        data, rep = asyncio.run(sampler.sample(ranks, step=10, version=0))
        out.append((time.perf_counter() - t0, sum(b.num_rows for b in data + rep)))


def run_case(ray, args, shards: int, run_dir: str) -> dict:
    """One timed run: `shards` replay shards and an expert buffer on a fresh `run_dir`, the writers
    adding for `args.seconds` while the driver samples. Returns the figures; the actors are killed."""
    from sm_dist.buffer.replay import ReplayBuffer
    from sm_dist.buffer.schema import rows_to_batch
    from sm_dist.orchestrator.actors import build_replay
    from sm_dist.orchestrator.sampler import BatchSampler

    cfg = SimpleNamespace(
        buffer=SimpleNamespace(
            capacity_rows=200_000, capacity_bytes=1 << 34, shards=shards, wait_for_replay=False,
            max_staleness=4, newest_first=False, fill_with_data=True,
        ),
        run=SimpleNamespace(run_dir=run_dir, seed=0), objective=SimpleNamespace(warmup_steps=0),
        sync=SimpleNamespace(timeout_s=60.0),
        split_batch=lambda: (args.batch_size // 2, args.batch_size - args.batch_size // 2),
    )  # fmt: skip
    replay = build_replay(ray, cfg)
    expert = ray.remote(num_cpus=0)(ReplayBuffer).remote(f"{run_dir}/expert", 10**9, 1 << 40, 1)
    data = [dict(r, source="data", policy_version=-1) for r in rollout_rows(512, args.actions, 99, "data")]
    ray.get(expert.add.remote(rows_to_batch(data)))
    for k, h in enumerate(replay.handles):  # every shard starts with a batch's worth of rows
        ray.get(h.add.remote(rows_to_batch(rollout_rows(args.batch_size, args.actions, 98, f"seed{k}"))))
    W = ray.remote(num_cpus=0)(Writer)
    names = [f"w{i}" for i in range(args.writers)]
    writers = [
        W.remote(replay.for_worker(n), args.rows_per_add, args.actions, n, i) for i, n in enumerate(names)
    ]
    ray.get([w.__ray_ready__.remote() for w in writers])
    sampler = BatchSampler(ray, cfg, replay, expert, SimpleNamespace(stopping=True))  # never waits
    stop, samples = threading.Event(), []
    drv = threading.Thread(target=driver_loop, args=(sampler, args.ranks, stop, samples))
    before = replay.stats()["added_rows"]
    t0 = time.perf_counter()
    drv.start()
    lats = ray.get([w.run.remote(args.seconds) for w in writers])
    wall = time.perf_counter() - t0
    stop.set()
    drv.join()
    st = replay.stats()
    per_shard = [s["added_rows"] for s in st.get("shards", [st])]
    for a in [*writers, *replay.handles, expert]:
        ray.kill(a)
    lat = [x for ls in lats for x in ls]
    return {
        "rows_s": (st["added_rows"] - before) / wall, "lat_med": statistics.median(lat),
        "lat_p90": sorted(lat)[int(0.9 * len(lat))], "samples_s": len(samples) / wall,
        "sampled_rows_s": sum(n for _, n in samples) / wall,
        "sample_med": statistics.median([s for s, _ in samples]) if samples else float("nan"),
        "per_shard": per_shard, "wall": wall,
    }  # fmt: skip


def report(args, results: dict[int, list[dict]]) -> tuple[int, float]:
    """Print the medians per shard count, the workers-fed estimates and the ratios; return the best
    count and its rows/s."""
    med = {
        s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "per_shard"}
        for s, rs in results.items()
    }
    for s, m in med.items():
        rows = ", ".join(f"{r['rows_s']:,.0f}" for r in results[s])
        print(f"{s} shard{'s' * (s != 1)}: {m['rows_s']:,.0f} acknowledged rows/s (median of {rows}); add latency "
              f"median {m['lat_med'] * 1e3:.1f} ms, p90 {m['lat_p90'] * 1e3:.1f} ms; driver {m['samples_s']:.1f} "
              f"batches/s ({m['sampled_rows_s']:,.0f} rows/s), sample median {m['sample_med'] * 1e3:.1f} ms; rows "
              f"added per shard (last repeat) {results[s][-1]['per_shard']}")  # fmt: skip
    for s, m in med.items():
        for name, tok_s in (("1B", args.engine_tok_s_1b), ("8B", args.engine_tok_s_8b)):
            fed = ", ".join(
                f"{m['rows_s'] / (tok_s / tpr):,.1f} at {tpr} tok/row" for tpr in args.tokens_per_row
            )
            print(f"workers fed, {s} shard{'s' * (s != 1)}, {name} engine ({tok_s:,.0f} tok/s): {fed}")
    base = min(med)
    for s in sorted(med)[1:]:
        print(f"{s} shards over {base}: rows/s x{med[s]['rows_s'] / med[base]['rows_s']:.2f}, "
              f"sampled batches/s x{med[s]['samples_s'] / med[base]['samples_s']:.2f}")  # fmt: skip
    best = max(med, key=lambda s: med[s]["rows_s"])
    print(f"best: {best} shard{'s' * (best != 1)} ({med[best]['rows_s']:,.0f} rows/s)")
    return best, med[best]["rows_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="buffer.shards values to compare")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per shard count (interleaved)")
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--rows-per-add", type=int, default=32, help="rows per add (rollout.batch_size)")
    ap.add_argument("--actions", type=int, default=14)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of one timed run")
    ap.add_argument("--batch-size", type=int, default=64, help="learner.batch_size (half replay)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--engine-tok-s-8b", type=float, default=12_500.0)
    ap.add_argument("--engine-tok-s-1b", type=float, default=50_000.0)
    ap.add_argument("--tokens-per-row", type=int, nargs="+", default=[14, 256, 1024])
    args = ap.parse_args()

    import ray

    tmp = tempfile.mkdtemp(prefix="sm-buffer-bench-")
    results: dict[int, list[dict]] = {s: [] for s in args.shards}
    try:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=f"{tmp}/ray")
        for rep in range(args.repeats):
            for s in args.shards:
                results[s].append(run_case(ray, args, s, f"{tmp}/run-{s}-{rep}"))
                shutil.rmtree(f"{tmp}/run-{s}-{rep}", ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.writers} writer processes x {args.rows_per_add} rows/add ({args.actions} actions), driver sampling "
          f"{args.batch_size} rows/step over {args.ranks} ranks, {args.repeats} x {args.seconds:g} s per shard count "
          f"on {args.num_cpus} CPUs")  # fmt: skip
    best, rows_s = report(args, results)
    print(f"buffer_rows_per_s: {rows_s:.0f}")


if __name__ == "__main__":
    main()
