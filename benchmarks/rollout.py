"""Rollout throughput: plain vLLM generation vs backspace-aware generation at a forced <bkspc> rate.

On one engine in one run (repeats interleaved, median reported):
  plain  = vLLM `LLM.generate` with the same prompts, temperature and max_tokens (no stop on <bkspc>);
  bkspc  = `BackspaceEngine.generate` with <bkspc> forced at `--bkspc-rate` of the actions (plus the
           model's own), i.e. stop, pop, resubmit with prefix caching.
Tokens counted = actions generated (tokens + <bkspc> + <eos>). Then aggregate tokens/s for 1 and 2
RolloutWorker actors (Ray, one CPU each). Last line: `bkspc_gen_over_plain_gen: X`.

    python benchmarks/rollout.py --prompts 64 --max-actions 128 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from sm_dist.orchestrator.cluster import init_local_ray, set_process_env

set_process_env()  # before any vllm import


def make_prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    """n arithmetic questions (the project's add_or_sub_in_base generator), tokenised."""
    from sm_dist.data.arith import generate

    return [tok.encode(q["prompt"], add_special_tokens=False) for q in generate(n, "easy", seed)]


def time_plain(engine, prompts, params) -> tuple[float, int]:
    from vllm import SamplingParams

    sps = [
        SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed + i,
            max_tokens=params.max_actions,
            logprobs=0,
            detokenize=False,
        )
        for i in range(len(prompts))
    ]
    t0 = time.perf_counter()
    outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


def time_bkspc(engine, prompts, params) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    rollouts = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    return dt, sum(len(r.action_ids) for r in rollouts), sum(r.num_backspaces for r in rollouts)


def bench_workers(model_dir, prompts, params, n_workers: int, batches: int) -> float:
    """Aggregate actions/s of `n_workers` RolloutWorker actors each running `batches` batches."""
    import ray

    from sm_dist.rollout.worker import RolloutWorker

    shard = len(prompts) // n_workers
    workers = [
        ray.remote(num_cpus=1)(RolloutWorker).remote(
            f"w{i}", model_dir, prompts[i * shard : (i + 1) * shard], params, batch_size=shard
        )
        for i in range(n_workers)
    ]
    ray.get([w.version.remote() for w in workers])  # engines started
    ray.get([w.run_batch.remote() for w in workers])  # warm-up
    t0 = time.perf_counter()
    stats = ray.get([w.run_batch.remote() for w in workers for _ in range(batches)])  # queued per worker
    dt = time.perf_counter() - t0
    for w in workers:
        ray.kill(w)
    return sum(s["rollout/actions"] for s in stats) / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="model folder (default: build the tiny model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-actions", type=int, default=128)
    ap.add_argument("--bkspc-rate", type=float, default=0.05)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker-batches", type=int, default=2)
    ap.add_argument("--skip-workers", action="store_true")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from sm_dist.core.tiny import make_tiny_model
    from sm_dist.rollout.engine import BackspaceEngine, RolloutParams

    model_dir = args.model_dir or str(make_tiny_model(tempfile.mkdtemp(prefix="smdist-bench-") + "/model"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tok, args.prompts)
    print(f"model {model_dir}; {len(prompts)} prompts, max_actions {args.max_actions}", flush=True)
    engine = BackspaceEngine(model_dir, worker_extension_cls=None)
    plain_p = RolloutParams(temperature=args.temperature, max_actions=args.max_actions, forbid_bkspc=True)
    bk_p = RolloutParams(
        temperature=args.temperature,
        max_actions=args.max_actions,
        force_bkspc_rate=args.bkspc_rate,
        max_backspaces=args.max_actions,
    )
    time_plain(engine, prompts, plain_p)  # warm-up both paths
    time_bkspc(engine, prompts, bk_p)
    plain_tps, bk_tps = [], []
    for rep in range(args.repeats):
        dt, n = time_plain(engine, prompts, plain_p)
        plain_tps.append(n / dt)
        dt2, n2, nb = time_bkspc(engine, prompts, bk_p)
        bk_tps.append(n2 / dt2)
        print(
            f"repeat {rep}: plain {n} tok in {dt:.2f}s = {n / dt:.0f} tok/s | bkspc {n2} actions "
            f"({nb / max(n2, 1):.1%} <bkspc>) in {dt2:.2f}s = {n2 / dt2:.0f} tok/s",
            flush=True,
        )
    plain, bk = statistics.median(plain_tps), statistics.median(bk_tps)
    print(f"median plain {plain:.0f} tok/s, backspace-aware {bk:.0f} tok/s", flush=True)
    del engine

    if not args.skip_workers:
        import gc

        import ray

        gc.collect()
        init_local_ray(num_cpus=2)
        for n_workers in (1, 2):
            tps = bench_workers(model_dir, prompts, bk_p, n_workers, args.worker_batches)
            print(f"{n_workers} worker actor(s): {tps:.0f} tok/s aggregate (backspace-aware)", flush=True)
        ray.shutdown()
    print(f"bkspc_gen_over_plain_gen: {bk / plain:.3f}")


if __name__ == "__main__":
    main()
