"""`sm-dist text-metrics`, `plot` and `bench`: reading models and runs, and the benchmarks."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sm_dist.errors import ModelError, UserError

BENCHMARKS = {
    "learner-step": "learner_step.py",
    "rollout": "rollout.py",
    "weight-sync": "weight_sync.py",
    "pipeline": "pipeline.py",
    "gpu-equivalence": "gpu_equivalence.py",
    "arith": "arith_sm_vs_mle.py",
    "scaling": "scaling.py",
    "learner-memory": "learner_memory.py",
    "buffer-throughput": "buffer_throughput.py",
    "lora-rows": "lora_rows.py",
    "lora-sync": "lora_sync.py",
    "lora-step": "lora_step.py",
    "before-after": "before_after.py",
    "checkpoint-io": "checkpoint_io.py",
}


def _plot(args) -> int:
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        problem = "has no metrics.jsonl" if Path(args.run_dir).is_dir() else "does not exist"
        raise UserError(
            args.run_dir,
            f"{problem}; nothing to plot.",
            "pass the run.run_dir of a run that has logged steps",
        )
    from sm_dist.eval.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _text_metrics(args) -> int:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sm_dist.data.datasets import load_examples
    from sm_dist.eval.text_metrics import text_metrics

    if not (Path(args.model) / "config.json").is_file():
        raise ModelError(f"--model {args.model}", "is not an HF model folder (no config.json).", "pass one")
    examples, report = load_examples(args.data, text_field=args.field, on_bad=args.on_bad, limit=args.limit)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    samples = [tok.encode(e.prompt + e.answer, add_special_tokens=False) for e in examples]
    out = {**text_metrics(samples, model), "skipped": dict(report.skipped)}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


def _bench(args) -> int:
    import subprocess

    root = Path(__file__).resolve().parents[2] / "benchmarks"  # sm_dist/cli/analysis.py -> the repo root
    script = root / BENCHMARKS[args.name]
    if not script.exists():
        print(
            f"sm-dist bench: {script} not found; the benchmarks live in the sm-dist source tree "
            "(git clone, then pip install -e .), not in an installed wheel",
            file=sys.stderr,
        )
        return 2
    # the repo root on the path: a benchmark may share helpers with the tests (gpu_equivalence.py)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root.parent), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.call([sys.executable, str(script), *args.args], cwd=root.parent, env=env)


def add_analysis_parsers(sub) -> None:
    tm = sub.add_parser(
        "text-metrics", help="distinct-n, repetition, n-gram entropy and perplexity of texts under a model"
    )
    tm.add_argument("--model", required=True, help="HF model folder (perplexity and tokenisation)")
    tm.add_argument("--data", required=True, help="plain text (one sample a line) or jsonl with --field")
    tm.add_argument("--field", default=None, help="jsonl field holding each text (default: plain text file)")
    tm.add_argument("--on-bad", choices=["error", "skip"], default="error")
    tm.add_argument("--limit", type=int, default=None)
    tm.add_argument("--out", help="also write the JSON here")
    tm.set_defaults(func=_text_metrics)

    pl = sub.add_parser("plot", help="training curves of a run (metrics.jsonl) to PNG files")
    pl.add_argument("run_dir", help="a run directory written by `sm-dist train`")
    pl.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    pl.set_defaults(func=_plot)

    b = sub.add_parser(
        "bench",
        help="run a benchmark of benchmarks/ (its last line is `name: value`)",
        description="Benchmarks: "
        + ", ".join(f"{k} ({v})" for k, v in BENCHMARKS.items())
        + ". Arguments after the name go to the script (e.g. sm-dist bench learner-step -- --attn split).",
    )
    b.add_argument("name", choices=sorted(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    b.set_defaults(func=_bench)
