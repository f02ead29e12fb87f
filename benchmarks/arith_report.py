"""The report of benchmarks/arith_sm_vs_mle.py: tables, the issue's verdict, plots, docs/results.md."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _ms(vals) -> tuple[float, float]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _fmt(vals) -> str:
    m, s = _ms(vals)
    return f"{m:.3f} ± {s:.3f}"


TABLE = [
    ("accuracy (search)", "search", "accuracy"),
    ("accuracy (no <bkspc>)", "greedy_no_bkspc", "accuracy"),
    ("recovery accuracy", "recovery", "accuracy"),
    ("sampled accuracy (T=1)", "sample", "accuracy"),
    ("pass@4 (T=1)", "sample", "pass_at_k"),
    ("malformed (search)", "search", "malformed_rate"),
    ("bkspc_rate", "search", "bkspc_rate"),
    ("answers using <bkspc>", "search", "answers_using_bkspc"),
    ("cap hits", "search", "bkspc_cap_hits"),
]


def result_table(res: dict) -> list[str]:
    lines = ["| model | seeds | " + " | ".join(t[0] for t in TABLE) + " |", "|---" * (len(TABLE) + 2) + "|"]
    for name, runs in res.items():
        cells = [_fmt([r.get(dec, {}).get(key) for r in runs]) for _, dec, key in TABLE]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def sweep_table(sw: dict) -> list[str]:
    keys = ("chi2_weight", "p_noise", "sm_lambda", "rollouts_per_row")
    terms = ("loss/data_term", "loss/chi2_data", "loss/chi2_model", "loss/value_data", "loss/value_model")
    lines = [
        f"MLE on validation: accuracy {sw['mle_val']['accuracy']:.3f}, malformed {sw['mle_val']['malformed_rate']:.3f}.",
        "",
        "| variant | c | p_noise | λ | rollouts/row | val accuracy | malformed | bkspc_rate | "
        + " | ".join(t.split("/")[1] for t in terms)
        + " |",
        "|---" * (8 + len(terms)) + "|",
    ]
    for r in sw["rows"]:
        sm = r["variant"] == "sm"
        knobs = [f"{r[k]:g}" if sm else "-" for k in keys]
        if not sm:
            knobs[1] = f"{r['bc_p_noise']:g}"
        v, t = r["val"], r.get("terms", {})
        cells = [f"{v['accuracy']:.3f}", f"{v['malformed_rate']:.3f}", f"{v['bkspc_rate']:.3f}"]
        cells += [f"{t[x]:.3g}" if x in t else "-" for x in terms]
        lines.append(f"| {r['variant']} | " + " | ".join(knobs + cells) + " |")
    return lines


def plots(fin: dict, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = fin["results"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names, width = list(res), 0.27
    for j, (label, dec) in enumerate(
        (("search", "search"), ("no <bkspc>", "greedy_no_bkspc"), ("recovery", "recovery"))
    ):
        stats = [_ms([r[dec]["accuracy"] for r in res[n]]) for n in names]
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], label=label, capsize=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test exact match")
    ax.set_title("add_or_sub_in_base: mean ± std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "arith_accuracy.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ps = sorted(fin["curve"])
    mle = _ms([r["search"]["accuracy"] for r in res["mle"]])
    ax.axhline(mle[0], color="gray", ls="--", label=f"mle (p=0) {mle[0]:.3f}")
    for variant in ("bc_noise", "sm"):
        stats = [_ms([r["search"]["accuracy"] for r in fin["curve"][p][variant]]) for p in ps]
        ax.errorbar(
            ps, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=variant
        )
    ax.set_xlabel("p_noise")
    ax.set_ylabel("test exact match (search decoding)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "arith_noise.png", dpi=110)
    plt.close(fig)


def verdict(res: dict) -> list[str]:
    """The issue's criteria, computed: gap > 2 x the larger seed std, malformed <= half of MLE's."""
    sm, mle = ([r["search"]["accuracy"] for r in res[v]] for v in ("sm", "mle"))
    (m_sm, s_sm), (m_mle, s_mle) = _ms(sm), _ms(mle)
    gap, need = m_sm - m_mle, 2 * max(s_sm, s_mle)
    mal_sm = _ms([r["search"]["malformed_rate"] for r in res["sm"]])[0]
    mal_mle = _ms([r["search"]["malformed_rate"] for r in res["mle"]])[0]
    wins = gap > need
    fewer_malformed = mal_sm <= 0.5 * mal_mle
    return [
        f"- SequenceMatch − MLE test accuracy: **{gap:+.3f}** (needed: > 2 × max seed std = {need:.3f}) → "
        + ("**SequenceMatch wins**." if wins else "**SequenceMatch does not win** at this setting."),
        f"- malformed-answer rate: SequenceMatch {mal_sm:.3f} vs MLE {mal_mle:.3f} → "
        + ("at most half of MLE's." if fewer_malformed else "**not** at most half of MLE's."),
    ]


def _lever_table(res: dict, variants: tuple[str, ...]) -> list[str]:
    """One lever's variants on validation: search accuracy, malformed, backspaces, recovery and the
    sampled (T = 1) accuracy and pass@4 where the eval has them."""
    lines = [
        "| variant | accuracy | malformed | bkspc_rate | recovery | sampled (T=1) | pass@4 |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        r = res[v]
        samp = " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in ("sampled", "pass_at_4"))
        lines.append(
            f"| {v} | {r['accuracy']:.3f} | {r['malformed_rate']:.3f} | {r['bkspc_rate']:.3f} | {r['recovery']:.3f} | {samp} |"
        )
    return [*lines, ""]


def write_report(fin: dict, sw: dict | None, a, minutes: dict, base_info: dict) -> None:
    res, ch = fin["results"], fin["chosen"]
    lines = [
        "# SequenceMatch vs MLE on add_or_sub_in_base",
        "",
        "_Written by `python benchmarks/arith_sm_vs_mle.py --out DIR` "
        f"(wall minutes on {os.cpu_count()} cores of the invocations that ran them: "
        + ", ".join(f"{k} {v:.0f}" for k, v in minutes.items())
        + "; pretraining, included in the first, took "
        + f"{base_info.get('minutes', float('nan')):.1f}; a rerun reuses finished runs)._",
        "",
        f"Task: DeepMind's `add_or_sub_in_base`, `easy` level, bases {a.bases}, from the project's generator.",
        f"Test: {a.n_test} questions, used once for this page; tuning used a separate {a.n_val}-question",
        "validation split; both exclude every question of the shared training files, the finetune data",
        "and the pretraining data. Exact match after collapsing `<bkspc>`. Mean ± sample std over seeds "
        f"{list(range(a.seeds))}.",
        "",
        "## Result (test split)",
        "",
        *result_table(res),
        "",
        *verdict(res),
        "",
        "Decodings: **search** (default of `sm-dist eval`, recommended for backspace models: greedy, but",
        "a token deleted at a state is never chosen again at that state, so `<bkspc>` acts as search and",
        "cannot loop); **no `<bkspc>`** (greedy with `<bkspc>` forbidden: the control); **recovery** (search",
        "after one wrong token is forced into the answer prefix at a random position: a model without",
        "`<bkspc>` cannot undo it).",
        "",
        "![accuracy](arith_accuracy.png) ![accuracy against p_noise](arith_noise.png)",
        "",
        "## Settings",
        "",
        f"- base: tiny Llama, hidden {a.hidden}, {a.layers} layers, heads of 64, char-level tokenizer; MLE-pretrained",
        f"  {a.pretrain_steps} steps × {a.pretrain_batch} rows (lr {a.pretrain_lr}) on {a.pretrain_questions} fresh",
        f"  generator questions in {base_info.get('minutes', float('nan')):.1f} min.",
        f"- finetunes: {a.ft_steps} learner steps, lr {a.ft_lr} (cosine, warmup 5), {a.data_rows} expert rows",
        f"  per step for every variant, {a.ft_examples} finetune questions; SequenceMatch: chi2_mixture,",
        f"  c = {ch['chi2_weight']}, p_noise = {ch['p_noise']}, λ = {ch['sm_lambda']} after {a.warmup} BC",
        f"  warmup steps, {ch['rollouts_per_row']} rollout row(s) per expert row, γ = 0.998; bc_noise:",
        f"  p_noise = {ch['bc_p_noise']}. 2 vLLM rollout workers, weights synced every 5 steps",
        "  (configs/tiny-cpu.yaml otherwise).",
        "",
    ]
    if sw:
        lines += ["## Sweep (validation split, seed 0, one factor at a time)", "", *sweep_table(sw), ""]
        lines += [f"Chosen: `{json.dumps(sw['chosen'])}`. Loss terms: mean of the last 20 logged steps.", ""]
        if sw.get("correction_rows_val"):
            c = sw["correction_rows_val"]
            lines += [
                "Self-correction rows from the model's own mistakes (`rollout.correction_rows=true`, chosen "
                f"setting, validation): accuracy {c['accuracy']:.3f}, malformed {c['malformed_rate']:.3f}, "
                f"bkspc_rate {c['bkspc_rate']:.3f}, recovery {c['recovery']:.3f}.",
                "",
            ]
        if sw.get("little_data_val"):
            ld = sw["little_data_val"]
            lines += [
                f"Little data ({ld['examples']} finetune questions, chosen setting, validation, seed 0):",
                "",
                *_lever_table(ld, ("mle", "bc_noise", "sm")),
            ]
        if sw.get("weak_base_val"):
            wb = sw["weak_base_val"]
            lines += [
                f"Weak base (pretraining stopped at {wb['pretrain_steps']} steps, then {wb['ft_steps']} finetune "
                "steps per variant, chosen setting, validation, seed 0):",
                "",
                *_lever_table(wb, ("base", "mle", "bc_noise", "sm")),
            ]
        if sw.get("bias_levers"):
            lines += [
                "Inference-time `<bkspc>` logit bias on the best SequenceMatch model (validation, search):",
                "",
            ]
            lines += ["| decoding | accuracy | malformed | bkspc_rate |", "|---|---|---|---|"]
            for k, v in sw["bias_levers"].items():
                lines.append(
                    f"| {k} | {v['accuracy']:.3f} | {v['malformed_rate']:.3f} | {v['bkspc_rate']:.3f} |"
                )
            lines.append("")
    reading = DOCS / "arith_reading.md"  # the hand-written interpretation, kept across reruns
    lines += [
        "## Reading",
        "",
        reading.read_text().strip() if reading.exists() else "(no docs/arith_reading.md)",
        "",
    ]
    lines += ["## Reproduce", "", "```bash", "python benchmarks/arith_sm_vs_mle.py --out runs/arith --sweep",
              "python benchmarks/arith_sm_vs_mle.py --out runs/arith --levers   # optional, validation only",
              "python benchmarks/arith_sm_vs_mle.py --out runs/arith", "```", ""]  # fmt: skip
    (DOCS / "results_same_regime.md").write_text("\n".join(lines))


# ---- the transfer regime (benchmarks/arith_transfer.py) -----------------------------------------------

TRANSFER_TABLE = [
    ("sampled accuracy (T=1)", "sample", "accuracy"),
    ("pass@4 (T=1)", "sample", "pass_at_k"),
    ("accuracy (search)", "search", "accuracy"),
    ("accuracy (no <bkspc>)", "greedy_no_bkspc", "accuracy"),
    ("recovery (uniform)", "recovery", "accuracy"),
    ("recovery (plausible)", "recovery_plausible", "accuracy"),
    ("<bkspc> precision (sampled)", "sample", "bkspc_precision"),
    ("bkspc_rate (sampled)", "sample", "bkspc_rate"),
    ("repeat cycles (sampled)", "sample", "repeat_cycles"),
    ("cap hits (sampled)", "sample", "bkspc_cap_hits"),
    ("malformed (search)", "search", "malformed_rate"),
]


def transfer_report(fin: dict, path: Path, write_docs: bool) -> str:
    """The transfer regime's page: result table (mean ± std over seeds), H1 and H2 as measured, the
    gate, the sweep and the minutes; to `path`, and to docs/results.md with `write_docs`."""
    res, g, sw, st = fin["results"], fin["gate"], fin["sweep"], fin["settings"]
    head = "| model | seeds | " + " | ".join(t[0] for t in TRANSFER_TABLE) + " |"
    lines = ["# SequenceMatch vs MLE, transfer regime (issue 23)", "",
             f"_Written by `python benchmarks/arith_sm_vs_mle.py --regime transfer`; minutes (wall, this "
             f"machine): {', '.join(f'{k} {v:.1f}' for k, v in fin['minutes'].items())}._", "",
             f"Pretrained (MLE) on bases {st['pretrain_bases']}; finetuned and evaluated on bases "
             f"{st['ft_bases']}: {st['ft_examples']} finetune, {st['n_val']} validation, {st['n_test']} test "
             "questions, disjoint. Test split, mean ± std over seeds.", "",
             head, "|---" * (len(TRANSFER_TABLE) + 2) + "|"]  # fmt: skip
    for name, runs in res.items():
        cells = [_fmt([r[d].get(k) for r in runs]) for _, d, k in TRANSFER_TABLE]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")

    lines += ["", *_answers(res), ""]
    lines += [
              f"Gate (MLE finetune gain over the base on validation, search): "
              f"{'passed' if g['passed'] else 'NOT passed'}; base {g['base_val']['accuracy']:.3f}; tries: "
              + ", ".join(f"{t['ft_steps']} steps -> {t['gain_points']:+.1f} points" for t in g["tries"])
              + f". Every arm used {g['ft_steps']} finetune steps.", "",
              "## Sweep (validation, seed 0)", "",
              "| arm | c | p_noise | sampled | pass@4 | search | recovery (plausible) | <bkspc> precision | "
              "write/delete cycles (sampled) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sw["rows"]:
        v = r["val"]
        lines.append(f"| {r['arm']} | {r['chi2_weight'] if r['chi2_weight'] is not None else '-'} | "
                     f"{r['p_noise']} | {v['sampled']:.3f} | {v['pass_at_4']:.3f} | {v['accuracy']:.3f} | "
                     f"{v['recovery_plausible']:.3f} | {_num(v['sampled_bkspc_precision'])} | "
                     f"{v.get('sampled_repeat_cycles')} |")  # fmt: skip
    for r in sw.get("remedy", []):  # the loop remedy (truncated_value=complete) at the same settings
        v = r["val"]
        lines.append(f"| sm_plausible, truncated_value=complete | {r['chi2_weight']} | {r['p_noise']} | "
                     f"{v['sampled']:.3f} | {v['pass_at_4']:.3f} | {v['accuracy']:.3f} | "
                     f"{v['recovery_plausible']:.3f} | {_num(v['sampled_bkspc_precision'])} | "
                     f"{v.get('sampled_repeat_cycles')} |")  # fmt: skip
    lines += ["", f"Chosen (best sampled accuracy of sm_plausible): `{json.dumps(sw['chosen'])}`.", "",
              "Settings: `" + json.dumps(st) + "`"]  # fmt: skip
    reading = DOCS / "arith_transfer_reading.md"  # the hand-written reading of these figures, kept on reruns
    if reading.exists():
        lines += ["", reading.read_text().rstrip()]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    if write_docs:
        (DOCS / "results.md").write_text(text)
    return text


def _verdict(a: list[float], b: list[float]) -> str:
    """'higher than' / 'lower than' when the means differ by more than the two spreads together (std
    over seeds), else 'within the seeds' spread of'; one-seed arms have no spread, so never more than that."""
    (ma, sa), (mb, sb) = _ms(a), _ms(b)
    if len(a) < 2 or len(b) < 2 or abs(ma - mb) <= sa + sb:
        return "within the seeds' spread of"
    return "higher than" if ma > mb else "lower than"


def _answers(res: dict) -> list[str]:
    """H1 and H2, each a plain sentence per decoding (sampled, then search), from the test split."""
    out = []
    for h, other, claim in (("H1", "mle", "<bkspc> + plausible noise beats MLE"),
                            ("H2", "bc_plausible", "SequenceMatch beats BC at matched noise")):  # fmt: skip
        for d, name in (("sample", "sampled (T=1)"), ("search", "search")):
            a = [r[d]["accuracy"] for r in res["sm_plausible"]]
            b = [r[d]["accuracy"] for r in res[other]]
            (ma, sa), (mb, sb) = _ms(a), _ms(b)
            v = _verdict(a, b)
            yes = "yes" if v == "higher than" else "no"
            out.append(f"- {h} ({claim}), {name} accuracy: **{yes}**: sm_plausible {ma:.3f} ± {sa:.3f} is {v} "
                       f"{other} {mb:.3f} ± {sb:.3f} (difference {ma - mb:+.3f}, {len(a)} and {len(b)} "
                       "seeds).")  # fmt: skip
    return out


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
