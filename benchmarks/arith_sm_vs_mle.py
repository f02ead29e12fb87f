"""The paper's arithmetic claim, measured fairly: SequenceMatch vs MLE on add_or_sub_in_base.

    python benchmarks/arith_sm_vs_mle.py --out DIR            # the final comparison, on the test split
    python benchmarks/arith_sm_vs_mle.py --out DIR --sweep    # the tuning sweep, on the validation split
    python benchmarks/arith_sm_vs_mle.py --regime transfer --out DIR   # issue 23 (benchmarks/arith_transfer.py)

1. Splits (`sm_dist.data.arith.generate`, our own generator of DeepMind's task): a validation and a
   test set of `easy` questions, disjoint from each other and from every question of the shared
   training files when they exist; finetune data (`--ft-examples` questions) and pretraining data are
   drawn with other seeds, excluding both held-out sets. `--bases` narrows the task (fewer bases).
2. A base model that can do the task: a tiny Llama MLE-pretrained in-process (no Ray) on fresh
   generator data; its accuracy is reported beside the finetunes.
3. Finetunes from that base through `sm-dist train` (local Ray, vLLM rollout workers, replay buffer,
   weight syncs). Every variant takes the same expert rows per learner step (`--data-rows`), the same
   steps and LR schedule; SequenceMatch's rollout rows come in addition (`buffer.fill_with_data=false`):
     mle       MLE on clean data                     objective.divergence.kind=mle, p_noise=0
     bc_noise  BC on noise + <bkspc> data            objective.divergence.kind=mle, p_noise=P
     sm        SequenceMatch (chi^2-mixture)         noise + <bkspc>, rollouts, BC warmup, lambda
4. Evaluation with one vLLM engine per model: `search` decoding (greedy, a token deleted at a state is
   never re-chosen there: the recommended decoding of a backspace model), `greedy_no_bkspc` (the
   control), and the recovery measure (one wrong token forced into the answer prefix, `search`).
5. `--sweep` tunes on validation only (one seed, one factor at a time, in the issue's ranges) and
   writes docs/arith_sweep.json; the final run reads its choice from there (or the CHOSEN defaults),
   runs 3 seeds of each variant plus accuracy against p_noise, evaluates on test once, and writes
   docs/results_same_regime.md with plots. Finished runs and evals in DIR are reused by a rerun.

Last line: `sm_minus_mle_accuracy: X` (test accuracy, search decoding, mean over seeds); with
`--sweep`: `sweep_best_sm_minus_mle_val: X`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from arith_report import _ms, plots, write_report  # noqa: E402  (beside this script)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "arith"
DOCS = ROOT / "docs"
SWEEP_JSON = DOCS / "arith_sweep.json"
# The setting the final comparison uses when docs/arith_sweep.json has no choice (see --sweep).
CHOSEN = {"p_noise": 0.1, "chi2_weight": 1e-3, "sm_lambda": 0.5, "rollouts_per_row": 1, "bc_p_noise": 0.1}
SWEEP = {
    "chi2_weight": [1e-4, 1e-3, 1e-2, 0.1, 1.0, 25.0],  # the range, and 1e-4 below it
    "p_noise": [0.05, 0.1, 0.2],
    "sm_lambda": [0.5, 0.9],
    "rollouts_per_row": [1, 2],
}
DECODINGS = {
    "search": {},
    "greedy_no_bkspc": {"decoding": "greedy_no_bkspc"},
    "recovery": {"force_error": True},
    "recovery_plausible": {"force_error": True, "force_error_kind": "plausible"},  # arithmetic prompts only
    "sample": {"decoding": "sample", "samples": 4},  # temperature 1: mean accuracy and pass@4
}


def sh(cmd: list[str], log: Path) -> None:
    """Run a command, its output to `log`; raise with the log's tail if it fails."""
    print("$", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"command failed (exit {rc}); last lines of {log}:\n" + log.read_text()[-3000:])


# ---- data -------------------------------------------------------------------------------------------


def _questions(n: int, seed: int, exclude: set[str], bases: set[int] | None) -> list[dict]:
    """`n` new easy questions (the project's generator); their prompts join `exclude`."""
    from sm_dist.data.arith import generate

    out = generate(n, "easy", seed, exclude=exclude, bases=bases)
    exclude.update(q["prompt"] for q in out)
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_splits(out: Path, a) -> dict[str, Path]:
    """val / test / finetune-train jsonl files (disjoint); pretraining data is drawn later."""
    paths = {k: out / f"{k}.jsonl" for k in ("val", "test", "ft_train")}
    if all(p.exists() for p in paths.values()):
        return paths
    seen: set[str] = set()
    for f in SHARED.glob("add_or_sub_in_base.train-*.jsonl"):  # the paper's files, where present
        seen |= {json.loads(line)["prompt"] for line in f.read_text().splitlines() if line.strip()}
    bases = _bases(a)
    _write(paths["val"], _questions(a.n_val, 1001, seen, bases))
    _write(paths["test"], _questions(a.n_test, 1002, seen, bases))
    _write(paths["ft_train"], _questions(a.ft_examples, 1003, seen, bases))
    print(f"splits: val {a.n_val}, test {a.n_test}, finetune {a.ft_examples} (bases {a.bases})", flush=True)
    return paths


def _bases(a) -> set[int] | None:
    return None if a.bases == "all" else {int(b) for b in a.bases.split(",")}


# ---- pretraining ------------------------------------------------------------------------------------


def pretrain(
    out: Path, splits: dict[str, Path], a, name: str = "pretrained", steps: int | None = None
) -> Path:
    """MLE pretraining with the project's Learner on fresh generator data (`steps`, default
    --pretrain-steps) into DIR/<name>; returns the model dir."""
    from transformers import AutoTokenizer

    from sm_dist.config import LearnerConfig, ObjectiveConfig
    from sm_dist.core.tiny import make_tiny_model
    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.data.datasets import Example, augment, encode_examples, make_data_rows
    from sm_dist.learner.learner import Learner

    steps = steps or a.pretrain_steps
    model_dir = out / name
    if (model_dir / "model" / "config.json").exists():
        return model_dir / "model"
    held = {json.loads(x)["prompt"] for k in ("val", "test") for x in splits[k].read_text().splitlines()}
    qs = _questions(a.pretrain_questions, 7, held, _bases(a))
    init = make_tiny_model(out / "init", hidden_size=a.hidden, num_layers=a.layers, num_heads=a.hidden // 64)
    tok = AutoTokenizer.from_pretrained(init)
    enc, _ = encode_examples([Example(q["prompt"], q["answer"]) for q in qs], tok, 48, 16, on_overlong="skip")
    bk = get_bkspc_id(tok)
    rows = make_data_rows(augment(enc, bk, 0.0, [], seed=0), bk)  # clean data: no noise actions
    lc = LearnerConfig(lr=a.pretrain_lr, lr_warmup_steps=100)
    learner = Learner(0, 1, str(init), lc, ObjectiveConfig(divergence={"kind": "mle"}), steps)
    rng, t0, log = random.Random(0), time.perf_counter(), []
    for step in range(steps):
        m = learner.train_step(rng.sample(rows, a.pretrain_batch))
        log.append({"step": step + 1, "loss/total": m["loss/total"]})
        if step % 500 == 0 or step == steps - 1:
            s = time.perf_counter() - t0
            print(f"pretrain {step + 1}/{steps} loss {m['loss/total']:.3f} ({s:.0f}s)", flush=True)
    learner.save(str(model_dir))
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    info = {"minutes": (time.perf_counter() - t0) / 60, "steps": steps}
    (model_dir / "pretrain.json").write_text(json.dumps(info))
    return model_dir / "model"


# ---- finetuning -------------------------------------------------------------------------------------


def overrides(variant: str, s: dict, a) -> list[str]:
    """`sm-dist train` overrides of one variant at setting `s` (module docstring, step 3)."""
    n = a.data_rows
    if variant == "sm_corr":  # SequenceMatch + expert rows built from its own mistakes (a lever)
        return [*overrides("sm", s, a), "rollout.correction_rows=true"]
    if variant == "sm":
        k = s["rollouts_per_row"]
        return [
            "objective.divergence.kind=chi2_mixture", f"data.p_noise={s['p_noise']}",
            f"objective.divergence.chi2_weight={s['chi2_weight']}", f"objective.sm_lambda={s['sm_lambda']}",
            f"objective.warmup_steps={a.warmup}", f"learner.batch_size={n * (1 + k)}",
            f"buffer.replay_fraction={k / (1 + k)}", "buffer.fill_with_data=false",
            f"rollout.batch_size={max(16, n * k // 2)}",
        ]  # fmt: skip
    p = 0.0 if variant == "mle" else s["bc_p_noise"]
    return [
        "objective.divergence.kind=mle", f"data.p_noise={p}", f"learner.batch_size={n}", "buffer.replay_fraction=0",
        "buffer.wait_for_replay=false", "rollout.num_workers=1",
    ]  # fmt: skip


def finetune(run: Path, base: Path, train: Path, variant: str, s: dict, seed: int, a) -> Path:
    """One `sm-dist train` run; returns its final model dir (reused when already there)."""
    model = run / "checkpoints" / f"step-{a.ft_steps:08d}" / "model"
    if (run / "summary.json").exists() and model.exists():
        return model
    if run.exists():
        shutil.rmtree(run)  # an unfinished run from an interrupted invocation
    cmd = [sys.executable, "-m", "sm_dist", "train", "configs/tiny-cpu.yaml",
           f"model.dir={base}", "model.make_tiny_if_missing=false", f"data.train_path={train}",
           "data.fallback=none", "data.limit=null", f"run.run_dir={run}", f"run.total_steps={a.ft_steps}",
           f"run.seed={seed}", f"learner.lr={a.ft_lr}", "run.progress=false",
           f"run.checkpoint_every={a.ft_steps}", *overrides(variant, s, a)]  # fmt: skip
    sh(cmd, run.parent / f"{run.name}.log")
    return model


# ---- evaluation -------------------------------------------------------------------------------------


# Inference-time <bkspc> logit bias (a lever of the issue), tried on the validation split only.
BIAS_DECODINGS = {f"search_bias{b:+g}": {"bkspc_bias": float(b)} for b in (-4, -2, -1, 1, 2)}


def evaluate(model: Path, data: Path, out_json: Path, levers: bool = False) -> dict:
    """Every decoding of DECODINGS (BIAS_DECODINGS with `levers`) on one model, one vLLM engine (a
    subprocess: one engine a process)."""
    if not out_json.exists():
        cmd = [sys.executable, __file__, "--eval-model", model, "--eval-data", data, "--eval-out", out_json]
        cmd += ["--eval-levers"] if levers else []
        sh(cmd, out_json.with_suffix(".log"))
    return json.loads(out_json.read_text())


def _eval_in_process(model: Path, data: Path, out_json: Path, levers: bool) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sm_dist.eval.arith_eval import evaluate as run_eval
    from sm_dist.rollout.engine import BackspaceEngine

    engine = BackspaceEngine(model, worker_extension_cls=None)
    res, examples = {}, {}
    for name, kw in (BIAS_DECODINGS if levers else DECODINGS).items():
        r = run_eval(model, data, engine=engine, progress=False, max_actions=24, max_backspaces=4, **kw)
        examples[name] = r.pop("examples")
        res[name] = r
    out_json.with_suffix(".examples.json").write_text(json.dumps(examples))
    out_json.write_text(json.dumps(res, indent=1))


# ---- the two modes ----------------------------------------------------------------------------------


def run_variant(out, base, splits, variant, s, seeds, split, a, tag="") -> list[dict]:
    """Finetune + evaluate `variant` at setting `s` for `seeds`; runs live at DIR/<tag><variant>/seed<k>."""
    res = []
    for seed in seeds:
        d = out / f"{tag}{variant}" / f"seed{seed}"
        model = finetune(d / "run", base, splits["ft_train"], variant, s, seed, a)
        if not (d / "model").exists():
            shutil.copytree(model, d / "model")
        ev = evaluate(d / "model", splits[split], d / f"eval-{split}.json")
        ev["train_metrics"] = _tail_metrics(d / "run")
        res.append(ev)
        print(f"{tag}{variant} seed {seed}: {split} accuracy {ev['search']['accuracy']:.3f}", flush=True)
    return res


def _tail_metrics(run: Path, last: int = 20) -> dict:
    """Mean of each loss term over the last `last` logged steps (what each term contributes)."""
    from sm_dist.service.metrics import read_metrics

    rows = read_metrics(run)[-last:]
    vals: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith(("loss/", "r/", "v/")) and isinstance(v, (int, float)):
                vals.setdefault(k, []).append(v)
    return {k: statistics.mean(v) for k, v in sorted(vals.items())}


def levers(out: Path, base: Path, splits, a) -> dict:
    """Levers beyond the sweep, on the validation split at the chosen setting: SequenceMatch with
    self-correction rows from its own rollouts (rollout.correction_rows)."""
    sw = json.loads(SWEEP_JSON.read_text())
    ev = run_variant(out, base, splits, "sm_corr", sw["chosen"], [0], "val", a, "lever/")[0]
    sw["correction_rows_val"] = _brief(ev)
    # little data (Wulfmeier et al.): the first `--little-examples` finetune questions, every variant
    small = out / "little" / "ft_train.jsonl"
    small.parent.mkdir(exist_ok=True)
    small.write_text("".join(splits["ft_train"].read_text().splitlines(keepends=True)[: a.little_examples]))
    little = {**splits, "ft_train": small}
    sw["little_data_val"] = {"examples": a.little_examples}
    for v in ("mle", "bc_noise", "sm"):
        sw["little_data_val"][v] = _brief(
            run_variant(out, base, little, v, sw["chosen"], [0], "val", a, "little/")[0]
        )
    # a weak base (pretraining stopped early), so that the finetune is what teaches the task
    weak = pretrain(out, splits, a, "weak/pretrained", a.weak_pretrain_steps)
    wa = argparse.Namespace(**{**vars(a), "ft_steps": a.weak_ft_steps})
    sw["weak_base_val"] = {
        "pretrain_steps": a.weak_pretrain_steps,
        "ft_steps": a.weak_ft_steps,
        "base": _brief(evaluate(weak, splits["val"], out / "weak" / "pretrained" / "eval-val.json")),
    }
    for v in ("mle", "bc_noise", "sm"):
        sw["weak_base_val"][v] = _brief(
            run_variant(out, weak, splits, v, sw["chosen"], [0], "val", wa, "weak/")[0]
        )
    SWEEP_JSON.write_text(json.dumps(sw, indent=1))
    return sw


def _brief(ev: dict) -> dict:
    return {k: ev["search"][k] for k in ("accuracy", "malformed_rate", "bkspc_rate")} | {
        "recovery": ev["recovery"]["accuracy"],
        "sampled": ev["sample"]["accuracy"],
        "pass_at_4": ev["sample"]["pass_at_k"],
    }


def sweep(out: Path, base: Path, splits, a) -> dict:
    """One factor at a time on the validation split, one seed; each stage keeps the best so far."""
    best = dict(CHOSEN)
    table = {"mle": run_variant(out, base, splits, "mle", best, [0], "val", a, "sweep/")[0]["search"]}
    rows = []
    for p in SWEEP["p_noise"] if a.sweep_bc_p_noise else [best["bc_p_noise"]]:
        s = {**best, "bc_p_noise": p}
        acc = run_variant(out, base, splits, "bc_noise", s, [0], "val", a, f"sweep/p{p}-")[0]
        rows.append({"variant": "bc_noise", **s, "val": acc["search"], "terms": acc["train_metrics"]})
    best["bc_p_noise"] = max((r for r in rows), key=lambda r: r["val"]["accuracy"])["bc_p_noise"]
    for knob in a.sweep_knobs:
        values = SWEEP[knob]
        scores = {}
        for v in values:
            s = {**best, knob: v}
            tag = "sweep/" + "-".join(
                f"{k}{s[k]}" for k in ("chi2_weight", "p_noise", "sm_lambda", "rollouts_per_row")
            )
            ev = run_variant(out, base, splits, "sm", s, [0], "val", a, tag + "-")[0]
            scores[v] = ev["search"]["accuracy"]
            if not any(r["variant"] == "sm" and all(r[k] == s[k] for k in SWEEP) for r in rows):
                rows.append({"variant": "sm", **s, "val": ev["search"], "terms": ev["train_metrics"]})
        best[knob] = max(values, key=lambda v: (scores[v], -values.index(v)))
    if not a.sweep_bc_p_noise:
        best["bc_p_noise"] = best["p_noise"]  # untuned: the same noise rate as SequenceMatch
    top = max((r for r in rows if r["variant"] == "sm"), key=lambda r: r["val"]["accuracy"])
    d = (
        out
        / (
            "sweep/"
            + "-".join(f"{k}{top[k]}" for k in ("chi2_weight", "p_noise", "sm_lambda", "rollouts_per_row"))
            + "-sm"
        )
        / "seed0"
    )
    ev = evaluate(d / "model", splits["val"], d / "eval-val-levers.json", levers=True)
    levers = {k: {m: v[m] for m in ("accuracy", "malformed_rate", "bkspc_rate")} for k, v in ev.items()}
    result = {
        "chosen": best,
        "mle_val": table["mle"],
        "rows": rows,
        "split": "val",
        "seed": 0,
        "bias_levers": levers,
    }
    DOCS.mkdir(exist_ok=True)
    SWEEP_JSON.write_text(json.dumps(result, indent=1))
    return result


def final(out: Path, base: Path, splits, a, report) -> dict:
    """3 seeds of mle / bc_noise / sm at the chosen setting (report written), then accuracy against
    p_noise (report rewritten after each point); test split."""
    chosen = json.loads(SWEEP_JSON.read_text())["chosen"] if SWEEP_JSON.exists() else dict(CHOSEN)
    seeds = list(range(a.seeds))
    res = {"pretrained": [evaluate(base, splits["test"], out / "pretrained" / "eval-test.json")]}
    for variant in ("mle", "bc_noise", "sm"):
        res[variant] = run_variant(out, base, splits, variant, chosen, seeds, "test", a)
    fin = {"chosen": chosen, "results": res, "curve": {}}
    report(fin)
    for p in a.curve_p_noise:  # the paper's main figure
        for variant, key in (("bc_noise", "bc_p_noise"), ("sm", "p_noise")):
            if p == chosen[key]:
                runs = res[variant]
            else:
                runs = run_variant(out, base, splits, variant, {**chosen, key: p}, seeds, "test", a, f"p{p}/")
            fin["curve"].setdefault(p, {})[variant] = runs
        report(fin)
    return fin


def record_minutes(out: Path, mode: str, t0: float) -> dict:
    """Wall minutes of the invocations that did the work, per mode, kept in DIR/timings.json: an
    invocation that only reuses finished runs (under a minute) does not overwrite them."""
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    minutes = (time.perf_counter() - t0) / 60
    if minutes >= 1.0 or mode not in timings:
        timings[mode] = round(minutes, 1)
        path.write_text(json.dumps(timings, indent=1))
    return timings


def parse_args(argv=None):
    import arith_transfer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--regime",
        choices=["same", "transfer"],
        default="same",
        help="same: pretrain and finetune on one distribution (docs/results_same_regime.md); transfer: "
        "pretrain on bases 2-10, finetune and evaluate on 11-16 (benchmarks/arith_transfer.py)",
    )
    arith_transfer.add_args(ap)
    ap.add_argument("--out", default="runs/arith_sm_vs_mle", help="working folder (reused by a rerun)")
    ap.add_argument("--sweep", action="store_true", help="tune on the validation split instead")
    ap.add_argument("--levers", action="store_true", help="after --sweep: further levers on validation")
    ap.add_argument("--little-examples", type=int, default=500, help="--levers: the little-data finetune set")
    ap.add_argument(
        "--weak-pretrain-steps", type=int, default=2500, help="--levers: the weak base's pretraining"
    )
    ap.add_argument(
        "--weak-ft-steps", type=int, default=300, help="--levers: finetune steps from the weak base"
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bases", default="all", help="'all' or a comma list, e.g. 2,10,16")
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pretrain-questions", type=int, default=100_000)
    ap.add_argument("--pretrain-steps", type=int, default=4000)
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--ft-examples", type=int, default=5000)
    ap.add_argument("--ft-steps", type=int, default=100)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--data-rows", type=int, default=32, help="expert rows per learner step, every variant")
    ap.add_argument("--warmup", type=int, default=20, help="SequenceMatch's BC warmup steps")
    ap.add_argument(
        "--sweep-knobs",
        nargs="*",
        default=list(SWEEP),
        choices=list(SWEEP),
        help="knobs --sweep tunes, in order",
    )
    ap.add_argument("--sweep-bc-p-noise", action="store_true", help="--sweep also tunes bc_noise's p_noise")
    ap.add_argument("--curve-p-noise", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    ap.add_argument("--eval-model", type=Path, help=argparse.SUPPRESS)  # internal: one model's evals
    ap.add_argument("--eval-data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--eval-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--eval-levers", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.regime == "transfer":  # its own defaults for the flags not given
        ap.set_defaults(**arith_transfer.DEFAULTS)
        a = ap.parse_args(argv)
    return a


def main() -> None:
    a = parse_args()
    if a.eval_model:
        return _eval_in_process(a.eval_model, a.eval_data, a.eval_out, a.eval_levers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.regime == "transfer":
        import arith_transfer

        return arith_transfer.run(a)
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = make_splits(out, a)
    base = pretrain(out, splits, a)
    base_info = json.loads((out / "pretrained" / "pretrain.json").read_text())
    if a.levers:
        sw = levers(out, base, splits, a)
        record_minutes(out, "levers", t0)
        print(f"correction_rows_val_accuracy: {sw['correction_rows_val']['accuracy']:.4f}")
        return
    if a.sweep:
        sw = sweep(out, base, splits, a)
        record_minutes(out, "sweep", t0)
        best = max((r for r in sw["rows"] if r["variant"] == "sm"), key=lambda r: r["val"]["accuracy"])
        print(json.dumps(sw["chosen"]))
        print(f"sweep_best_sm_minus_mle_val: {best['val']['accuracy'] - sw['mle_val']['accuracy']:.4f}")
        return
    sw = json.loads(SWEEP_JSON.read_text()) if SWEEP_JSON.exists() else None

    def report(fin: dict) -> None:
        (out / "final.json").write_text(json.dumps(fin, indent=1, default=str))
        write_report(fin, sw, a, record_minutes(out, "final", t0), base_info)
        plots(fin, a)

    fin = final(out, base, splits, a, report)
    mean = {k: _ms([r["search"]["accuracy"] for r in v])[0] for k, v in fin["results"].items()}
    print(json.dumps(mean, indent=1))
    print(f"sm_minus_mle_accuracy: {mean['sm'] - mean['mle']:.4f}")


if __name__ == "__main__":
    main()
