"""Weight-sync cost: a full object-store sync vs a bare object-store round trip of the same weights.

  sync      = the object-store sender (what learner rank 0 runs) + the wait for the confirmation:
              state dict -> safetensors buffer (uint8 numpy, one copy) -> ray.put -> the RolloutWorker
              actor ray.gets it (zero-copy on the node) and loads it into vLLM (reload_weights) -> confirms;
  roundtrip = ray.put(the same buffer) + ray.get in another actor (returns the length); the buffer
              is made before the clock starts. Also printed: the round trip of the same weights as
              `bytes` (copied on get), the representation the transport used before.
Median over `--repeats`. Also printed, per transport (object_store, gloo) and per wire dtype (float32,
bfloat16: `model.dtype`, what leaves the learner), the bytes and seconds of one sync
(`bytes_per_sync[<transport>,<dtype>]: N`), and for LoRA (r=8, every linear layer) the seconds to build
the merged weights the learner sends; under FSDP2 on 2 gloo ranks, what rank 0 holds gathered to build
one sync, the whole model (`get_model_state_dict`, before) against the weight stream (one tensor at a
time, now): `fsdp2_gathered_bytes[full|stream]`. Last line: `sync_over_roundtrip: X` (against the numpy round trip).

    python benchmarks/weight_sync.py --hidden 512 --layers 4 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from sm_dist.orchestrator.cluster import init_local_ray, set_process_env

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

    from sm_dist.config import SyncConfig
    from sm_dist.core.tiny import make_tiny_model
    from sm_dist.rollout.engine import RolloutParams
    from sm_dist.rollout.worker import RolloutWorker
    from sm_dist.sync.base import deliver
    from sm_dist.sync.object_store import state_dict_to_buffer

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
    sender = SyncConfig(transport={"kind": "object_store"}).transport.sender(300.0)
    sender.connect([worker], ["bench"])

    sync_s, rt_s, rt_bytes_s = [], [], []
    for rep in range(args.repeats + 1):  # repeat 0 is a warm-up
        sd = model.state_dict()
        t0 = time.perf_counter()
        m = deliver(sender, rep + 1, sd)
        t1 = time.perf_counter()
        buf = state_dict_to_buffer(sd)
        t2 = time.perf_counter()
        ray.get(reader.read.remote([ray.put(buf)]))
        t3 = time.perf_counter()
        blob = bytes(buf)
        t4 = time.perf_counter()
        ray.get(reader.read.remote([ray.put(blob)]))
        t5 = time.perf_counter()
        del buf, blob
        print(
            f"repeat {rep}{' (warm-up)' if rep == 0 else ''}: sync {t1 - t0:.3f}s (serialize "
            f"{m['sync/serialize_s']:.3f}, put {m['sync/put_s']:.3f}; "
            f"{m['sync/bytes'] / 1e6:.1f} MB) | round trip {t3 - t2:.3f}s (as bytes {t5 - t4:.3f}s)",
            flush=True,
        )
        if rep:
            sync_s.append(t1 - t0)
            rt_s.append(t3 - t2)
            rt_bytes_s.append(t5 - t4)
    # the collective path (sync.transport.kind=gloo) on the same weights, for comparison: a worker built
    # as the driver builds it for gloo (threaded, the gloo receiver)
    gcfg = SyncConfig(transport={"kind": "gloo"})
    gworker = ray.remote(num_cpus=1, max_concurrency=2)(RolloutWorker).remote(
        "bench-gloo",
        str(model_dir),
        [[5, 6, 7]],
        RolloutParams(max_actions=4),
        batch_size=1,
        transport=gcfg.transport,
    )
    ray.kill(worker)
    gloo = gcfg.transport.sender(300.0)
    gloo.connect([gworker], ["bench-gloo"])
    gloo_s = []
    for rep in range(args.repeats + 1):
        t0 = time.perf_counter()
        gloo.send(100 + rep, model.state_dict())
        if rep:
            gloo_s.append(time.perf_counter() - t0)
    gworker_args = (gloo, gworker)
    sync, rt, rt_b = statistics.median(sync_s), statistics.median(rt_s), statistics.median(rt_bytes_s)
    per_dtype(ray, model, model_dir, args.repeats, gworker_args)
    print(
        f"gloo broadcast sync (sync.transport.kind=gloo): median {statistics.median(gloo_s):.3f}s", flush=True
    )
    print(f"median sync {sync:.3f}s, median round trip {rt:.3f}s (as bytes {rt_b:.3f}s)", flush=True)
    print(f"sync over the bytes round trip: {sync / rt_b:.3f}", flush=True)
    ray.shutdown()
    fsdp2_held(str(model_dir), args.repeats)
    print(f"sync_over_roundtrip: {sync / rt:.3f}")


def per_dtype(ray, model, model_dir: str, repeats: int, gloo_end) -> None:
    """Bytes and median seconds of one sync per transport and wire dtype; LoRA's merge cost."""
    import torch

    from sm_dist.config import LoraSettings, SyncConfig
    from sm_dist.learner import lora
    from sm_dist.rollout.engine import RolloutParams
    from sm_dist.rollout.worker import RolloutWorker
    from sm_dist.sync.base import deliver

    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(
        "bench-dtype", str(model_dir), [[5, 6, 7]], RolloutParams(max_actions=4), batch_size=1
    )
    obj = SyncConfig(transport={"kind": "object_store"}).transport.sender(300.0)
    gloo, gworker = gloo_end
    for dtype in (torch.float32, torch.bfloat16):
        obj.connect([worker], ["bench-dtype"], dtype=dtype)
        gloo.dtype = dtype  # connected above; only the wire dtype changes
        for name, send in (("object_store", lambda v: deliver(obj, v, model.state_dict())),
                           ("gloo", lambda v: gloo.send(v, model.state_dict()).metrics)):  # fmt: skip
            secs, nbytes = [], 0
            for rep in range(repeats + 1):
                t0 = time.perf_counter()
                nbytes = int(send(1000 + rep)["sync/bytes"])
                if rep:
                    secs.append(time.perf_counter() - t0)
            tag = f"{name},{str(dtype).removeprefix('torch.')}"
            print(f"sync_s[{tag}]: {statistics.median(secs):.4f}", flush=True)
            print(f"bytes_per_sync[{tag}]: {nbytes}", flush=True)
    peft_model = lora.apply_lora(model, LoraSettings(r=8), bkspc_id=model.config.vocab_size - 1)
    plan = lora.merge_plan(peft_model)
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lora.merged_state_dict(peft_model, peft_model.state_dict(), torch.bfloat16, plan)
        secs.append(time.perf_counter() - t0)
    trainable, total = lora.param_counts(peft_model)
    print(f"lora r=8: {trainable} trainable of {total} parameters", flush=True)
    print(f"lora_merge_s[bfloat16]: {statistics.median(secs):.4f}", flush=True)
    ray.kill(worker)


def _fsdp2_rank(rank: int, world: int, port: int, model_dir: str, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    from sm_dist.learner.sharded import decoder_layers, fully_shard_model
    from sm_dist.sync.object_store import state_dict_to_buffer
    from sm_dist.sync.stream import drain, from_state_dict

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fully_shard_model(model, decoder_layers(model))
    res: dict = {"full": [], "stream": []}
    for _ in range(repeats):
        t0 = time.perf_counter()  # before: the whole model gathered (fp32, host), then the bf16 buffer
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        held = sum(t.numel() * t.element_size() for t in sd.values())
        if rank == 0:
            state_dict_to_buffer(sd, torch.bfloat16)
        res["full"].append((time.perf_counter() - t0, held))
        del sd
        t0 = time.perf_counter()  # now: one tensor gathered at a time, straight into the bf16 buffer
        stream = from_state_dict(model.state_dict(), torch.bfloat16)
        if rank == 0:
            buf = state_dict_to_buffer(stream)
            res["wire"] = int(buf.nbytes)
        else:
            drain(stream)
        res["stream"].append((time.perf_counter() - t0, stream.largest_read_bytes))
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


def fsdp2_held(model_dir: str, repeats: int) -> None:
    """FSDP2 on 2 gloo ranks: what rank 0 holds beside its wire buffer to build one bf16 sync, before
    (`get_model_state_dict(full_state_dict=True)`: the whole model in fp32) and now (the weight stream:
    the largest single tensor), and the seconds of each (medians)."""
    import os

    import torch
    import torch.multiprocessing as mp

    from sm_dist.orchestrator.cluster import free_port

    out = tempfile.mkdtemp(prefix="smdist-bench-") + "/fsdp2.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_fsdp2_rank, args=(2, free_port("127.0.0.1"), model_dir, repeats, out), nprocs=2, join=True)
    res = torch.load(out)
    for how in ("full", "stream"):
        secs = statistics.median(s for s, _ in res[how])
        print(f"fsdp2_gathered_bytes[{how}]: {res[how][0][1]}", flush=True)
        print(f"fsdp2_sync_build_s[{how}]: {secs:.4f}", flush=True)
    print(f"fsdp2_wire_bytes[bfloat16]: {res['wire']}", flush=True)
    print(f"fsdp2_gathered_full_over_stream: {res['full'][0][1] / res['stream'][0][1]:.1f}", flush=True)


if __name__ == "__main__":
    main()
