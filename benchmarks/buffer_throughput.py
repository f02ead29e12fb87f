"""Rows per second that one replay-buffer actor and the driver's sampling loop sustain, and how many rollout
workers that feeds.

Real paths only: the buffer is `ray.remote(num_cpus=0)(ReplayBuffer)` as `sm_dist.actors` builds it, on a
run directory (every `add` writes an Arrow IPC segment, fsyncs, renames and rewrites the manifest before it
acknowledges); `--writers` Ray actor processes each call `add` with `--rows-per-add` rollout rows (the
rollout worker's `ray.get(buffer.add.remote(batch))`), as fast as acknowledgements come back; meanwhile the
driver runs `sm_dist.sampler.BatchSampler.sample` (replay + expert buffers, staleness filter, sharding
over `--ranks`) in a loop, as the learner loop does between steps. Rows are arithmetic-sized (prompt 30,
14 actions) unless `--actions` says otherwise; what a row costs the buffer grows with its length.

Printed: acknowledged rows/s (the buffer's sustained write rate while it also serves samples), samples/s,
add latency, and the workers-fed estimate: buffer rows/s over one GPU engine's rows/s, where an engine's
rows/s = its output tokens/s / tokens per row. Engine figures (`--engine-tok-s-8b`, `--engine-tok-s-1b`):

* 8B: 12,500 output tok/s, Llama 3.1 8B BF16 on 1x H100 80GB (vLLM, FlashInfer, 0.8 GPU memory
  utilisation), as collected on https://www.morphllm.com/vllm-benchmarks from third-party runs. vLLM's
  own v0.6.0 post (blog.vllm.ai/2024/09/05/perf-update.html, Llama 3 8B on 1x H100, ShareGPT) reports
  the 2.7x gain over v0.5.3 in relative terms, which is why the absolute number comes from that page.
* 1B: no published vLLM figure was found here; 4x the 8B figure (50,000 tok/s) is an assumption
  (decoding is memory-bound and a 1B model reads ~1/6 of the weights, less the CPU-side scheduling that
  then dominates). Override both with measured numbers when a GPU is lent.

Last line: `buffer_rows_per_s: X`.
"""

from __future__ import annotations

import argparse
import random
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

    def __init__(self, buffer, rows_per_add: int, actions: int, seed: int):
        from sm_dist.buffer.schema import rows_to_batch

        self.buffer = buffer
        self.batch = rows_to_batch(rollout_rows(rows_per_add, actions, seed, f"w{seed}"))

    def run(self, seconds: float) -> list[float]:
        import ray

        lat, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            ray.get(self.buffer.add.remote(self.batch))
            lat.append(time.perf_counter() - t0)
        return lat


def driver_loop(sampler: BatchSampler, ranks: int, stop: threading.Event, out: list) -> None:  # noqa: F821
    while not stop.is_set():
        t0 = time.perf_counter()
        data, rep = sampler.sample(ranks, step=10, version=0, wait=lambda *_: None, stopping=lambda: True)
        out.append((time.perf_counter() - t0, sum(b.num_rows for b in data + rep)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--rows-per-add", type=int, default=32, help="rows per add (rollout.batch_size)")
    ap.add_argument("--actions", type=int, default=14)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch-size", type=int, default=64, help="learner.batch_size (half replay)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--engine-tok-s-8b", type=float, default=12_500.0)
    ap.add_argument("--engine-tok-s-1b", type=float, default=50_000.0)
    ap.add_argument("--tokens-per-row", type=int, nargs="+", default=[14, 256, 1024])
    args = ap.parse_args()

    import ray

    from sm_dist.buffer.replay import ReplayBuffer
    from sm_dist.buffer.schema import rows_to_batch
    from sm_dist.sampler import BatchSampler

    tmp = tempfile.mkdtemp(prefix="sm-buffer-bench-")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=f"{tmp}/ray")
    try:
        Buf = ray.remote(num_cpus=0)(ReplayBuffer)
        replay = Buf.remote(f"{tmp}/run", 200_000, 1 << 34, 0)
        expert = Buf.remote(f"{tmp}/run/expert", 10**9, 1 << 40, 1)
        data = [
            dict(r, source="data", policy_version=-1) for r in rollout_rows(512, args.actions, 99, "data")
        ]
        ray.get(expert.add.remote(rows_to_batch(data)))
        ray.get(replay.add.remote(rows_to_batch(rollout_rows(args.batch_size, args.actions, 98, "seed"))))
        cfg = SimpleNamespace(
            buffer=SimpleNamespace(
                wait_for_replay=False, max_staleness=4, newest_first=False, fill_with_data=True
            ),
            objective=SimpleNamespace(warmup_steps=0),
            sync=SimpleNamespace(timeout_s=60.0),
            split_batch=lambda: (args.batch_size // 2, args.batch_size - args.batch_size // 2),
        )
        sampler = BatchSampler(ray, cfg, replay, expert)
        W = ray.remote(num_cpus=0)(Writer)
        writers = [W.remote(replay, args.rows_per_add, args.actions, seed=i) for i in range(args.writers)]
        ray.get([w.__ray_ready__.remote() for w in writers])
        stop, samples = threading.Event(), []
        drv = threading.Thread(target=driver_loop, args=(sampler, args.ranks, stop, samples))
        before = ray.get(replay.stats.remote())["added_rows"]
        t0 = time.perf_counter()
        drv.start()
        lats = ray.get([w.run.remote(args.seconds) for w in writers])
        wall = time.perf_counter() - t0
        stop.set()
        drv.join()
        added = ray.get(replay.stats.remote())["added_rows"] - before
    finally:
        ray.shutdown()
    lat = [x for ls in lats for x in ls]
    rows_s = added / wall
    print(f"{args.writers} writer processes x {args.rows_per_add} rows/add ({args.actions} actions), driver "
          f"sampling {args.batch_size} rows/step over {args.ranks} ranks, {wall:.1f} s on {args.num_cpus} CPUs")  # fmt: skip
    print(f"adds: {len(lat)} acknowledged, {rows_s:,.0f} rows/s; add latency median {statistics.median(lat) * 1e3:.1f} "
          f"ms, p90 {sorted(lat)[int(0.9 * len(lat))] * 1e3:.1f} ms")  # fmt: skip
    smp = [s for s, _ in samples]
    print(f"driver: {len(samples)} batches sampled ({len(samples) / wall:.1f}/s, "
          f"{sum(n for _, n in samples) / wall:,.0f} rows/s), sample median {statistics.median(smp) * 1e3:.1f} ms")  # fmt: skip
    for name, tok_s in (("1B", args.engine_tok_s_1b), ("8B", args.engine_tok_s_8b)):
        for tpr in args.tokens_per_row:
            eng = tok_s / tpr
            print(f"workers fed, {name} engine ({tok_s:,.0f} tok/s) at {tpr} tokens/row = {eng:,.1f} rows/s "
                  f"per engine: {rows_s / eng:,.1f}")  # fmt: skip
    print(f"buffer_rows_per_s: {rows_s:.0f}")


if __name__ == "__main__":
    main()
