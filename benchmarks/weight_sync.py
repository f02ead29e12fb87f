"""Weight-sync cost: a full object-store sync vs a bare object-store round trip of the same weights.

  sync      = ObjectStoreTransport.publish: state dict -> safetensors bytes -> ray.put -> the
              RolloutWorker actor ray.gets them and loads them into vLLM (reload_weights) -> confirms;
  roundtrip = ray.put(the same bytes) + ray.get in another actor (returns the length).
Median over `--repeats`. Last line: `sync_over_roundtrip: X`.

    python benchmarks/weight_sync.py --hidden 512 --layers 4 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from sm_dist.cluster import init_local_ray, set_process_env

set_process_env()  # before any vllm import


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512, help="tiny-model hidden size (heads of 64)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from sm_dist.core.tiny import make_tiny_model
    from sm_dist.rollout.engine import RolloutParams
    from sm_dist.rollout.worker import RolloutWorker
    from sm_dist.sync.object_store import ObjectStoreTransport, state_dict_to_bytes

    model_dir = make_tiny_model(
        tempfile.mkdtemp(prefix="smdist-bench-") + "/model",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {model_dir}: {n_params / 1e6:.1f}M params", flush=True)

    init_local_ray(num_cpus=4)

    @ray.remote(num_cpus=1)
    class Reader:
        def read(self, refs):
            return len(ray.get(refs[0]))

    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(
        "bench", str(model_dir), [[5, 6, 7]], RolloutParams(max_actions=4), batch_size=1
    )
    reader = Reader.remote()
    ray.get([worker.version.remote(), reader.read.remote([ray.put(b"x")])])
    transport = ObjectStoreTransport([worker], timeout_s=300, worker_names=["bench"])

    sync_s, rt_s = [], []
    for rep in range(args.repeats + 1):  # repeat 0 is a warm-up
        sd = model.state_dict()
        t0 = time.perf_counter()
        m = transport.publish(rep + 1, sd)
        t1 = time.perf_counter()
        blob = state_dict_to_bytes(sd)
        t2 = time.perf_counter()
        ray.get(reader.read.remote([ray.put(blob)]))
        t3 = time.perf_counter()
        del blob
        print(
            f"repeat {rep}{' (warm-up)' if rep == 0 else ''}: sync {t1 - t0:.3f}s (serialize "
            f"{m['sync/serialize_s']:.3f}, put {m['sync/put_s']:.3f}, apply {m['sync/apply_s']:.3f}; "
            f"{m['sync/bytes'] / 1e6:.1f} MB) | round trip {t3 - t2:.3f}s",
            flush=True,
        )
        if rep:
            sync_s.append(t1 - t0)
            rt_s.append(t3 - t2)
    sync, rt = statistics.median(sync_s), statistics.median(rt_s)
    print(f"median sync {sync:.3f}s, median round trip {rt:.3f}s", flush=True)
    ray.shutdown()
    print(f"sync_over_roundtrip: {sync / rt:.3f}")


if __name__ == "__main__":
    main()
