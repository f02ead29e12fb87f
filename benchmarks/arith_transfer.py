"""The transfer regime of issue 23: the finetune is where the model first meets the task.

    python benchmarks/arith_sm_vs_mle.py --regime transfer --out DIR     # everything, pretraining included

1. Splits (bases 11-16 of `easy` add_or_sub_in_base): finetune (--ft-examples, 5k), validation (--n-val,
   500) and test (--n-test, 1,000) questions, disjoint from each other and from the shared training
   files. Pretraining data: fresh questions in bases 2-10 only (disjoint by construction).
2. A base MLE-pretrained on bases 2-10 (`arith_sm_vs_mle.pretrain`), evaluated on bases 11-16.
3. The gate: the MLE finetune must gain at least --gate-points (5) points of validation accuracy
   (search) over the base; if not, the finetune is lengthened (x2, up to --gate-retries times) and the
   report says so, with the steps every arm then uses.
4. The sweep on validation (one seed): SequenceMatch with plausible noise over c in --sweep-c x p_noise
   in --sweep-p, and BC with plausible noise at each p_noise; SequenceMatch's (c, p) is chosen by
   sampled accuracy (T=1, 4 samples), BC takes the same p (matched noise, as in the paper).
   The loop remedy (`objective.truncated_value=complete`) then runs at the chosen (c, p_noise) and at the
   sweep's largest c, on validation, beside the same settings' rows of the sweep.
5. The final comparison on test: `mle`, `bc_plausible`, `sm_plausible` for --seeds seeds (3), and one
   seed of `bc_uniform`, `sm_uniform` (uniform task-alphabet noise) and `sm_model_noise` (the base's own
   top-k, `python -m sm_dist.data.noise` run once on the finetune data). Every arm takes the same
   expert rows per learner step, the same steps and LR schedule; SequenceMatch's rollout rows come in
   addition (arith_sm_vs_mle.overrides). Models at DIR/<variant>/seed<k>/model, eval JSON beside them.

Decodings of every eval: search, greedy_no_bkspc, recovery (uniform forced token), recovery_plausible
(a plausible forced token), sample (T=1, 4 samples: mean accuracy, pass@4), with <bkspc> precision and
write/delete cycle counts (sm_dist.eval.arith_eval).

Last line: `sm_minus_mle_sampled_accuracy: X` (test, sampled accuracy, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import arith_sm_vs_mle as base_bench  # noqa: E402  (beside this script)
from arith_report import _ms, transfer_report

PRETRAIN_BASES = "2,3,4,5,6,7,8,9,10"
FINETUNE_BASES = {11, 12, 13, 14, 15, 16}
# arm -> (objective arm of arith_sm_vs_mle.overrides, data.noise); the noise rate comes from the setting
ARMS = {
    "mle": ("mle", None),
    "bc_plausible": ("bc_noise", "plausible"),
    "sm_plausible": ("sm", "plausible"),
    "bc_uniform": ("bc_noise", "task"),
    "sm_uniform": ("sm", "task"),
    "sm_model_noise": ("sm", "model"),
}
SEEDS_ONE = ("bc_uniform", "sm_uniform", "sm_model_noise")


def make_splits(out: Path, a) -> dict[str, Path]:
    """val / test / ft_train jsonl files of bases 11-16, disjoint (and from the shared files)."""
    paths = {k: out / f"{k}.jsonl" for k in ("val", "test", "ft_train")}
    if all(p.exists() for p in paths.values()):
        return paths
    seen: set[str] = set()
    for f in base_bench.SHARED.glob("add_or_sub_in_base.train-*.jsonl"):
        seen |= {json.loads(line)["prompt"] for line in f.read_text().splitlines() if line.strip()}
    base_bench._write(paths["val"], base_bench._questions(a.n_val, 2001, seen, FINETUNE_BASES))
    base_bench._write(paths["test"], base_bench._questions(a.n_test, 2002, seen, FINETUNE_BASES))
    base_bench._write(paths["ft_train"], base_bench._questions(a.ft_examples, 2003, seen, FINETUNE_BASES))
    return paths


def arm_overrides(arm: str, s: dict, a, noise_path: Path | None) -> list[str]:
    """`sm-dist train` overrides of one arm at setting s = {chi2_weight, p_noise}."""
    kind, noise = ARMS[arm]
    setting = {"p_noise": s["p_noise"], "bc_p_noise": s["p_noise"], "chi2_weight": s["chi2_weight"]}
    setting |= {"sm_lambda": a.sm_lambda, "rollouts_per_row": 1}
    out = base_bench.overrides(kind, setting, a) + ["run.eval_path=null"]
    if noise is not None:
        out.append(f"data.noise.kind={noise}")
    if noise == "model":
        out.append(f"data.noise.path={noise_path}")
    if kind == "sm":
        out.append(f"objective.truncated_value={a.truncated_value}")
    return out


def run_arm(out, model, splits, arm, s, seeds, split, a, noise_path=None, tag="") -> list[dict]:
    """Finetune + evaluate one arm; runs at DIR/<tag><arm>/seed<k> (model/ and eval-<split>.json)."""
    res = []
    for seed in seeds:
        d = out / f"{tag}{arm}" / f"seed{seed}"
        ckpt = _finetune(d / "run", model, splits["ft_train"], arm_overrides(arm, s, a, noise_path), seed, a)
        if not (d / "model").exists():
            import shutil

            shutil.copytree(ckpt, d / "model")
        ev = base_bench.evaluate(d / "model", splits[split], d / f"eval-{split}.json")
        ev["train_metrics"] = base_bench._tail_metrics(d / "run")
        res.append(ev)
        print(f"{tag}{arm} seed {seed}: {split} search {ev['search']['accuracy']:.3f} "
              f"sampled {ev['sample']['accuracy']:.3f}", flush=True)  # fmt: skip
    return res


def _finetune(run: Path, model: Path, train: Path, over: list[str], seed: int, a) -> Path:
    """One `sm-dist train` run (arith_sm_vs_mle.finetune with these overrides); returns its final model."""
    ckpt = run / "checkpoints" / f"step-{a.ft_steps:08d}" / "model"
    if (run / "summary.json").exists() and ckpt.exists():
        return ckpt
    if run.exists():
        import shutil

        shutil.rmtree(run)
    cmd = [base_bench.sys.executable, "-m", "sm_dist", "train", "configs/tiny-cpu.yaml",
           f"model.dir={model}", "model.make_tiny_if_missing=false", f"data.train_path={train}",
           "data.fallback=none", "data.limit=null", f"run.run_dir={run}", f"run.total_steps={a.ft_steps}",
           f"run.seed={seed}", f"learner.lr={a.ft_lr}", "run.progress=false",
           f"run.checkpoint_every={a.ft_steps}", *over]  # fmt: skip
    base_bench.sh(cmd, run.parent / f"{run.name}.log")
    return ckpt


def gate(out: Path, model: Path, splits, a) -> dict:
    """MLE finetune vs the base on validation; lengthen the finetune (x2) until it gains --gate-points."""
    base_val = base_bench.evaluate(model, splits["val"], out / "pretrained" / "eval-val.json")
    tries = []
    for k in range(a.gate_retries + 1):
        ev = run_arm(out, model, splits, "mle", {"p_noise": 0.0, "chi2_weight": 0.0}, [0], "val", a,
                     tag=f"gate/steps{a.ft_steps}-")[0]  # fmt: skip
        gain = ev["search"]["accuracy"] - base_val["search"]["accuracy"]
        tries.append({"ft_steps": a.ft_steps, "mle_val": _brief(ev), "gain_points": 100 * gain})
        if 100 * gain >= a.gate_points or k == a.gate_retries:
            break
        print(f"gate: MLE gains {100 * gain:.1f} points < {a.gate_points}; finetune x2", flush=True)
        a.ft_steps *= 2
    g = {"base_val": _brief(base_val), "tries": tries, "ft_steps": a.ft_steps}
    g["passed"] = tries[-1]["gain_points"] >= a.gate_points
    print(f"gate: {'passed' if g['passed'] else 'NOT passed'} at {a.ft_steps} finetune steps "
          f"(gain {tries[-1]['gain_points']:.1f} points)", flush=True)  # fmt: skip
    return g


def _brief(ev: dict) -> dict:
    keys = ("accuracy", "malformed_rate", "bkspc_rate", "bkspc_precision", "repeat_cycles", "bkspc_cap_hits")
    keys += ("length_cap_hits",)
    return {k: ev["search"].get(k) for k in keys} | {
        "recovery": ev["recovery"]["accuracy"],
        "recovery_plausible": ev["recovery_plausible"]["accuracy"],
        "sampled": ev["sample"]["accuracy"],
        "pass_at_4": ev["sample"]["pass_at_k"],
        "sampled_bkspc_precision": ev["sample"].get("bkspc_precision"),
        "sampled_repeat_cycles": ev["sample"].get("repeat_cycles"),
    }


def sweep(out: Path, model: Path, splits, a) -> dict:
    """c x p_noise for sm_plausible, p_noise for bc_plausible, on validation (one seed)."""
    rows = []
    for p in a.sweep_p:
        ev = run_arm(out, model, splits, "bc_plausible", {"p_noise": p, "chi2_weight": 0.0}, [0], "val", a,
                     tag=f"sweep/p{p}-")[0]  # fmt: skip
        rows.append({"arm": "bc_plausible", "p_noise": p, "chi2_weight": None, "val": _brief(ev)})
        for c in a.sweep_c:
            s = {"p_noise": p, "chi2_weight": c}
            ev = run_arm(out, model, splits, "sm_plausible", s, [0], "val", a, tag=f"sweep/c{c}-p{p}-")[0]
            rows.append({"arm": "sm_plausible", **s, "val": _brief(ev), "terms": ev["train_metrics"]})
    sm = [r for r in rows if r["arm"] == "sm_plausible"]
    best = max(sm, key=lambda r: (r["val"]["sampled"], r["val"]["accuracy"]))
    return {"rows": rows, "chosen": {"p_noise": best["p_noise"], "chi2_weight": best["chi2_weight"]}}


def remedy(out: Path, model: Path, splits, chosen: dict, a) -> list[dict]:
    """The loop remedy on validation (seed 0): sm_plausible at the chosen (c, p_noise) and at the sweep's
    largest c, with objective.truncated_value=complete (sm_dist.core.objective docstring), beside the
    same settings' bootstrap rows of the sweep."""
    rows, ra = [], argparse.Namespace(**{**vars(a), "truncated_value": "complete"})
    for c in sorted({chosen["chi2_weight"], max(a.sweep_c)}):
        s = {"p_noise": chosen["p_noise"], "chi2_weight": c}
        ev = run_arm(
            out, model, splits, "sm_plausible", s, [0], "val", ra, tag=f"remedy/c{c}-p{s['p_noise']}-"
        )[0]
        rows.append({"arm": "sm_plausible", **s, "truncated_value": "complete", "val": _brief(ev)})
    return rows


def run(a) -> None:
    out = (base_bench.ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0, minutes = time.perf_counter(), {}
    splits = make_splits(out, a)
    pa = argparse.Namespace(**{**vars(a), "bases": PRETRAIN_BASES})  # pretraining: bases 2-10 only
    model = base_bench.pretrain(out, splits, pa)
    minutes["pretrain"] = json.loads((out / "pretrained" / "pretrain.json").read_text())["minutes"]
    t = time.perf_counter()
    g = gate(out, model, splits, a)
    minutes["gate"] = (time.perf_counter() - t) / 60
    noise_path = out / "model_noise.jsonl"
    if not noise_path.exists():  # the base's own top-k at each expert state of the finetune data
        base_bench.sh([base_bench.sys.executable, "-m", "sm_dist.data.noise", "--model", model, "--data",
                       splits["ft_train"], "--out", noise_path, "--top-k", str(a.noise_top_k),
                       "--max-prompt-len", "48", "--max-answer-len", "16"],
                      out / "model_noise.log")  # fmt: skip
    t = time.perf_counter()
    sw = sweep(out, model, splits, a)
    minutes["sweep"] = (time.perf_counter() - t) / 60
    t = time.perf_counter()
    sw["remedy"] = remedy(out, model, splits, sw["chosen"], a)
    minutes["remedy"] = (time.perf_counter() - t) / 60
    t = time.perf_counter()
    res = {"pretrained": [base_bench.evaluate(model, splits["test"], out / "pretrained" / "eval-test.json")]}
    for arm in ARMS:
        seeds = [0] if arm in SEEDS_ONE else list(range(a.seeds))
        res[arm] = run_arm(out, model, splits, arm, sw["chosen"], seeds, "test", a, noise_path)
    minutes["final"] = (time.perf_counter() - t) / 60
    minutes["total"] = (time.perf_counter() - t0) / 60
    fin = {"gate": g, "sweep": sw, "results": res, "minutes": minutes, "settings": _settings(a)}
    (out / "final.json").write_text(json.dumps(fin, indent=1, default=str))
    transfer_report(fin, out / "results.md", write_docs=a.docs)
    sampled = {k: _ms([r["sample"]["accuracy"] for r in v])[0] for k, v in res.items()}
    print(json.dumps(sampled, indent=1))
    print(f"sm_minus_mle_sampled_accuracy: {sampled['sm_plausible'] - sampled['mle']:.4f}")


def _settings(a) -> dict:
    keys = ("pretrain_steps", "pretrain_questions", "pretrain_batch", "pretrain_lr", "hidden", "layers",
            "ft_examples", "ft_steps", "ft_lr", "data_rows", "warmup", "sm_lambda", "n_val", "n_test",
            "seeds", "sweep_c", "sweep_p", "truncated_value", "noise_top_k")  # fmt: skip
    return {k: getattr(a, k) for k in keys} | {"pretrain_bases": PRETRAIN_BASES, "ft_bases": "11-16"}


# The transfer regime's defaults where they differ from the first regime's (arith_sm_vs_mle.parse_args):
# a shorter pretraining on other bases, a longer finetune at a higher LR (it has a task to teach).
DEFAULTS = {"pretrain_steps": 3000, "pretrain_questions": 60_000, "ft_steps": 200, "ft_lr": 5e-4}


def add_args(ap: argparse.ArgumentParser) -> None:
    """The transfer regime's own flags (the shared ones, e.g. --ft-steps, are arith_sm_vs_mle's)."""
    ap.add_argument("--gate-points", type=float, default=5.0, help="transfer: MLE gain over the base, points")
    ap.add_argument(
        "--gate-retries", type=int, default=2, help="transfer: finetune doublings the gate may do"
    )
    ap.add_argument("--sweep-c", type=float, nargs="*", default=[2.5e-3, 1e-2, 0.1])
    ap.add_argument("--sweep-p", type=float, nargs="*", default=[0.1, 0.25])
    ap.add_argument("--sm-lambda", type=float, default=0.5)
    ap.add_argument("--truncated-value", choices=["bootstrap", "complete"], default="bootstrap")
    ap.add_argument("--noise-top-k", type=int, default=5, help="transfer: sm_model_noise's top-k")
    ap.add_argument("--no-docs", dest="docs", action="store_false", help="do not write docs/results.md")
