"""Build the shipped base model and the held-out split of the embedded default (configs/tiny-cpu.yaml).

The shipped base was built in two runs of this script (1 torch thread each; ~12 + ~3 min on 2 busy cores):

    python benchmarks/make_base.py --out /tmp/stage1 --steps 2000
    python benchmarks/make_base.py --init /tmp/stage1 --seed 1 --steps 500    # -> models/tiny-arith-base

i.e. 2500 steps of 64 rows at a constant LR of 2e-3 (the second run with a fresh AdamW and new questions);
held-out accuracy (search decoding, 24 actions, 4 backspaces) 0.133 after the first run, 0.200 after the
second (it was 0.297 at 3000 steps and 0.363 at 3500: the base is stopped on the steep part of its curve,
where the finetune's decaying LR and data still help). `base.json` in the output records each run.

1. Held-out split (`--heldout`, default configs/data/arith/add_or_sub_in_base.heldout.jsonl): `--n-heldout`
   `easy` questions from the project's generator (`sm_dist.data.arith.generate`, seed `--heldout-seed`),
   none of whose prompts is in a bundled training file (configs/data/arith/*.train-*.jsonl).
2. Base (`--out`, default models/tiny-arith-base): `sm-dist make-tiny-model`'s tiny Llama (hidden 128,
   2 layers, 2 heads of 64, char-level tokenizer with `<bkspc>`), MLE-pretrained with the project's
   Learner on `--questions` fresh generator questions that exclude the held-out split, `--steps` steps of
   `--batch` rows at a *constant* LR (`--lr`, linear warmup 100 steps). Deliberately partway: a base
   pretrained to convergence with an annealed LR gains nothing from a finetune (docs/results_same_regime.md), while
   this one is stopped on its constant-LR plateau, so the finetune of the main job (a decaying LR, the
   bundled DeepMind training file, SequenceMatch) measurably improves it.
   Only the HF folder is kept (safetensors weights + tokenizer, loadable by transformers and vLLM), with
   `base.json` recording the arguments, the seconds and the final loss.

Deterministic in its seeds on one machine (CPU torch); `--snapshot-every K --snapshot-dir D` also saves
the model every K steps (to choose `--steps`). Last line: `base_pretrain_loss: X`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data" / "arith"


def make_heldout(path: Path, n: int, seed: int) -> list[dict]:
    """`n` easy questions disjoint from every bundled training file; written to `path` as jsonl."""
    from sm_dist.data.arith import generate

    seen: set[str] = set()
    for f in sorted(DATA.glob("add_or_sub_in_base.train-*.jsonl")):
        seen |= {json.loads(line)["prompt"] for line in f.read_text().splitlines() if line.strip()}
    rows = generate(n, "easy", seed, exclude=seen)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _save(learner, out: Path) -> None:
    """The HF folder only (weights + tokenizer): no optimiser state."""
    out.mkdir(parents=True, exist_ok=True)
    learner.module.save_pretrained(out, safe_serialization=True)
    learner.tokenizer.save_pretrained(out)
    learner.module.generation_config.save_pretrained(out)


def pretrain(out: Path, heldout: list[dict], a) -> dict:
    """MLE pretraining at a constant LR (module docstring, step 2); returns the figures."""
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from sm_dist.config import LearnerConfig, ObjectiveConfig
    from sm_dist.core.tiny import make_tiny_model
    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.data.arith import generate
    from sm_dist.data.datasets import Example, augment, encode_examples, make_data_rows
    from sm_dist.learner.learner import Learner

    torch.set_num_threads(a.threads)  # one thread: on a shared 2-core machine, no OpenMP spin-waits
    qs = generate(a.questions, "easy", a.seed, exclude={q["prompt"] for q in heldout})
    init = a.init or make_tiny_model(Path(tempfile.mkdtemp(prefix="smdist-base-")) / "init", seed=a.seed)
    tok = AutoTokenizer.from_pretrained(init)
    enc, _ = encode_examples([Example(q["prompt"], q["answer"]) for q in qs], tok, 48, 16, on_overlong="skip")
    bk = get_bkspc_id(tok)
    rows = make_data_rows(augment(enc, bk, 0.0, [], seed=0), bk)  # clean data: no noise actions
    lc = LearnerConfig(lr=a.lr, lr_warmup_steps=100, schedule="constant")
    learner = Learner(0, 1, str(init), lc, ObjectiveConfig(divergence={"kind": "mle"}), a.steps, seed=a.seed)
    rng, t0, loss = random.Random(a.seed), time.perf_counter(), float("nan")
    for step in range(1, a.steps + 1):
        loss = learner.train_step(rng.sample(rows, a.batch))["loss/total"]
        if step % 100 == 0 or step == a.steps:
            print(f"pretrain {step}/{a.steps} loss {loss:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if a.snapshot_every and step % a.snapshot_every == 0:
            _save(learner, Path(a.snapshot_dir) / f"step-{step}")
    _save(learner, out)
    keys = ("init", "steps", "batch", "lr", "questions", "seed", "n_heldout", "heldout_seed", "threads")
    info = {
        "built_by": "python benchmarks/make_base.py " + " ".join(sys.argv[1:]),
        **{k: str(v) if isinstance(v, Path) else v for k, v in ((k, getattr(a, k)) for k in keys)},
        "schedule": "constant (warmup 100)",
        "final_loss": loss,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if a.init and (Path(a.init) / "base.json").is_file():  # the recipe of the model it went on from
        info["init_recipe"] = json.loads((Path(a.init) / "base.json").read_text())
    (out / "base.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "tiny-arith-base")
    ap.add_argument("--heldout", type=Path, default=DATA / "add_or_sub_in_base.heldout.jsonl")
    ap.add_argument("--n-heldout", type=int, default=300)
    ap.add_argument("--heldout-seed", type=int, default=2001)
    ap.add_argument("--questions", type=int, default=50_000, help="pretraining questions (fresh, generated)")
    ap.add_argument(
        "--init", type=Path, help="go on from this model folder (a fresh AdamW) instead of a new tiny model"
    )
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--snapshot-every", type=int, default=0)
    ap.add_argument("--snapshot-dir", default="runs/base-snapshots")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    heldout = make_heldout(a.heldout, a.n_heldout, a.heldout_seed)
    print(f"held-out split: {len(heldout)} questions in {a.heldout}", flush=True)
    info = pretrain(a.out, heldout, a)
    print(f"base written to {a.out} in {info['seconds']:.0f}s")
    print(f"base_pretrain_loss: {info['final_loss']:.4f}")


if __name__ == "__main__":
    main()
