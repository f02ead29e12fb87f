"""Checkpoint save/load of the learners' training state, before and after sharding (issue 13), on 2 gloo
FSDP2 ranks (torch.multiprocessing, no Ray):

  before: the whole optimiser state gathered onto rank 0 (get_optimizer_state_dict(full_state_dict=True))
          and written there as one optimizer.pt with the full weights; loaded by every rank in full
  after:  each rank writes its own shard with torch.distributed.checkpoint (sm_dist.learner.sharded)

    python benchmarks/checkpoint_io.py --hidden 128 --layers 2          # the tiny model
    python benchmarks/checkpoint_io.py --hidden 768 --layers 12         # ~100M parameters

Prints seconds and bytes written per rank for each path, measured in one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _model(model_dir: str):
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer in m.model.layers:
        fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    m(torch.tensor([[1, 2, 3, 4]])).logits.float().pow(2).mean().backward()
    opt.step()  # moments exist
    return m, opt


def _before(m, opt, out: Path, rank: int) -> tuple[float, float, int]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    t0 = time.perf_counter()
    sd = get_model_state_dict(m, options=opts)
    osd = get_optimizer_state_dict(m, opt, options=opts)
    if rank == 0:
        torch.save({"model": sd, "optimizer": osd}, out / "full.pt")
    dist.barrier()
    save_s = time.perf_counter() - t0
    written = (out / "full.pt").stat().st_size if rank == 0 else 0
    t0 = time.perf_counter()
    full = torch.load(out / "full.pt", map_location="cpu", weights_only=True)
    lopts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(m, full["model"], options=lopts)
    set_optimizer_state_dict(m, opt, full["optimizer"], options=lopts)
    dist.barrier()
    return save_s, time.perf_counter() - t0, written


def _after(m, opt, out: Path, rank: int) -> tuple[float, float, int]:
    from sm_dist.learner import sharded

    t0 = time.perf_counter()
    sharded.save_state(m, opt, out / "state")
    dist.barrier()
    save_s = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in (out / "state").glob(f"__{rank}_*.distcp"))
    if rank == 0:
        written += (out / "state" / ".metadata").stat().st_size
    t0 = time.perf_counter()
    sharded.load_state(m, opt, out / "state")
    dist.barrier()
    return save_s, time.perf_counter() - t0, written


def _rank(rank: int, world: int, port: int, model_dir: str, out: str, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m, opt = _model(model_dir)
    for name, fn in (
        ("before (gather + torch.save on rank 0)", _before),
        ("after (DCP, a shard per rank)", _after),
    ):
        q.put((name, rank, *fn(m, opt, Path(out), rank)))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    a = ap.parse_args()
    from safetensors.torch import load_file

    from sm_dist.core.tiny import make_tiny_model
    from sm_dist.orchestrator.cluster import free_port

    with tempfile.TemporaryDirectory(prefix="ckio-") as tmp:
        md = make_tiny_model(
            Path(tmp) / "model", hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads
        )
        n = sum(t.numel() for t in load_file(str(md / "model.safetensors")).values())
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, 2, port, str(md), tmp, q)) for r in range(2)]
        for p in procs:
            p.start()
        rows = [q.get(timeout=1800) for _ in range(4)]
        for p in procs:
            p.join()
    print(f"model: {n / 1e6:.1f}M parameters (hidden {a.hidden}, {a.layers} layers), 2 FSDP2 gloo ranks")
    for name in dict.fromkeys(r[0] for r in rows):
        per = sorted((r for r in rows if r[0] == name), key=lambda r: r[1])
        cells = ", ".join(
            f"rank {r}: save {s:.2f}s load {ld:.2f}s wrote {b / 1e6:.1f} MB" for _, r, s, ld, b in per
        )
        print(f"  {name}: {cells}")


if __name__ == "__main__":
    main()
