"""Issue 23's transfer regime on one GPU, without vLLM, Ray, pydantic or pyarrow (the lent GPU machine).

    python benchmarks/arith_gpu.py --out /tmp/arith_gpu             # ~25M Llama, bf16, one H100, < 10 min
    python benchmarks/arith_gpu.py --out DIR --device cpu --preset smoke   # the same code, tiny, on a CPU

The design of benchmarks/arith_transfer.py, scaled up: a Llama of ~25M parameters (hidden 512, 8
layers, char-level tokenizer with <bkspc>) MLE-pretrained on bases 2-10 only, then finetuned on bases
11-16 by each arm, evaluated on validation (the gate) and test. Training is the learner's pure-torch
step (`sm_dist.learner.step.loss_and_backward`: single-pass masked layout, chunked loss, bf16 autocast)
with AdamW and a cosine schedule; SequenceMatch's rollouts and every evaluation come from the pure-torch
backspace-aware decoder (`sm_dist.eval.torch_decode`, checked against `sm-dist eval`'s vLLM path in
tests/integration/test_torch_decode.py). Every arm sees the same expert questions at each step (one
seeded index stream), the same steps and schedule; SequenceMatch's rollout rows (one per expert row,
sampled at T = 1 from the current weights: on-policy) come in addition.

Arms: mle, bc_plausible, sm_plausible, bc_uniform, sm_uniform, sm_model_noise (noise from the base's
own top-k at each expert state, from one forward pass over the finetune data). No sweep here (10
minutes): c and p_noise come from flags (default: the middle of the CPU sweep's grid). Results are
written after every arm (DIR/results.json), so a timeout keeps what finished; each arm's model at
DIR/<arm>/seed0/model with eval.json beside it. Last line: `sm_minus_mle_sampled_accuracy: X`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

PRESETS = {  # hidden, layers, heads, pretrain steps, pretrain batch, finetune steps, rows/step, questions
    "h100": dict(hidden=512, layers=8, heads=8, pretrain_steps=2500, pretrain_batch=256, ft_steps=300,
                 data_rows=64, pretrain_questions=200_000, ft_examples=5000, n_val=500, n_test=1000),
    "smoke": dict(hidden=64, layers=2, heads=1, pretrain_steps=8, pretrain_batch=16, ft_steps=3,
                  data_rows=8, pretrain_questions=300, ft_examples=60, n_val=16, n_test=16),
}  # fmt: skip
ATTN = "auto"  # --attn: FlexAttention on CUDA where a batch has a <bkspc>; rows without one: plain SDPA
ARMS = ("mle", "bc_plausible", "sm_plausible", "bc_uniform", "sm_uniform", "sm_model_noise")
DECODINGS = {
    "search": {},
    "greedy_no_bkspc": {"decoding": "greedy_no_bkspc"},
    "recovery": {"force_error": True},
    "recovery_plausible": {"force_error": True, "force_error_kind": "plausible"},
    "sample": {"decoding": "sample", "samples": 4},
}


def questions(a):
    """val / test / finetune (bases 11-16, disjoint) and pretraining (bases 2-10) questions."""
    from sm_dist.data.arith import generate

    seen: set[str] = set()
    out = {}
    for name, n, seed, bases in (("val", a.n_val, 2001, range(11, 17)), ("test", a.n_test, 2002, range(11, 17)),
                                 ("ft", a.ft_examples, 2003, range(11, 17)),
                                 ("pre", a.pretrain_questions, 7, range(2, 11))):  # fmt: skip
        out[name] = generate(n, "easy", seed, exclude=seen, bases=set(bases))
        seen |= {q["prompt"] for q in out[name]}
    return out


class Trainer:
    """A model, AdamW, a cosine schedule and the learner's step (`loss_and_backward`)."""

    def __init__(self, model, bk: int, objective: dict, steps: int, lr: float, warmup: int, **step_kw):
        from sm_dist.core.objective import ObjectiveParams
        from sm_dist.learner.step import StepParams

        on_gpu = next(model.parameters()).device.type == "cuda"
        self.model, self.step_i = model, 0
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

        def factor(s: int) -> float:  # linear warmup, then cosine to 0
            return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.p = StepParams(ObjectiveParams(bkspc_id=bk, **objective), attn=ATTN, pack=False,
                            autocast_dtype=torch.bfloat16 if on_gpu else None,
                            pad_to_multiple=8 if on_gpu else 1, **step_kw)  # fmt: skip

    def step(self, traces) -> dict:
        from sm_dist.learner.step import loss_and_backward

        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        m = loss_and_backward(self.model, traces, self.p, self.step_i)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.step_i += 1
        return m


def data_trace(prompt, target, bk, eos, actions=None, is_noise=None):
    from sm_dist.core.traces import build_inputs

    acts = list(target) if actions is None else actions
    return build_inputs(
        prompt, acts, bk, eos_id=eos, is_noise=is_noise or [False] * len(acts), from_data=True
    )


def encode(tok, qs):
    eos = tok.eos_token_id
    return [(tok.encode(q["prompt"], add_special_tokens=False),
             [*tok.encode(q["answer"], add_special_tokens=False), eos]) for q in qs]  # fmt: skip


def pretrain(model, tok, qs, a, bk) -> float:
    enc = encode(tok, qs)
    tr = Trainer(model, bk, {"divergence": "mle"}, a.pretrain_steps, a.pretrain_lr, 100)
    rng, t0 = random.Random(0), time.perf_counter()
    for s in range(a.pretrain_steps):
        if time.perf_counter() - t0 > 60 * a.pretrain_minutes:
            print(f"pretrain: stopped at step {s} by --pretrain-minutes {a.pretrain_minutes}", flush=True)
            a.pretrain_steps_done = s
            break
        m = tr.step([data_trace(p, t, bk, tok.eos_token_id) for p, t in rng.sample(enc, a.pretrain_batch)])
        if s % 250 == 0 or s == a.pretrain_steps - 1:
            print(f"pretrain {s + 1}/{a.pretrain_steps} loss {m['loss/total']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    return (time.perf_counter() - t0) / 60


@torch.no_grad()
def model_noise(model, enc, bk, k: int, specials: set[int]) -> list[list[list[int]]]:
    """The base's top-k tokens at each target position (expert token, specials, <bkspc> excluded): the
    torch twin of `sm_dist.data.noise.write_model_noise` (vLLM prompt log-probs)."""
    dev = next(model.parameters()).device
    out = []
    for p, t in enc:
        seq = torch.tensor([p + t], device=dev)
        logits = model(input_ids=seq).logits[0, len(p) - 1 : -1].float()  # [len(t), V]: predicts t
        top = logits.topk(k + len(specials) + 2, -1).indices.tolist()
        out.append([[c for c in row if c != t[i] and c not in specials][:k] for i, row in enumerate(top)])
    return out


def arm_noise(arm, tok, enc, qs, base, a, bk):
    """Per-example candidates of an arm's noise (None: no noise)."""
    from sm_dist.data.noise import plausible_candidates

    specials = set(tok.all_special_ids) | {bk}
    if arm == "mle":
        return None
    if arm.endswith("plausible"):
        v = tok.get_vocab()
        return [
            [[v[c] for c in cs if c in v] for cs in plausible_candidates(q["prompt"], q["answer"])]
            for q in qs
        ]
    if arm.endswith("uniform"):
        alphabet = sorted({x for _, t in enc for x in t} - specials)
        return [[alphabet] * len(t) for _, t in enc]
    return model_noise(base, enc, bk, a.noise_top_k, specials)


def finetune(arm, base_dir, tok, enc, qs, a, bk, cands, dev):
    """One arm from the base: `ft_steps` steps of `data_rows` expert rows (same indices for every arm)."""
    from transformers import AutoModelForCausalLM

    from sm_dist.core.traces import build_inputs
    from sm_dist.data.noise import candidate_noise
    from sm_dist.eval.torch_decode import DecodeParams, torch_generate

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(dev)
    sm = arm.startswith("sm_")
    obj = {
        "divergence": "chi2_mixture" if sm else "mle",
        "chi2_weight": a.c,
        "truncated_value": a.truncated_value,
    }
    sched = {"warmup_steps": a.sm_warmup, "sm_lambda": a.sm_lambda} if sm else {}
    tr = Trainer(model, bk, obj, a.ft_steps, a.ft_lr, 10, **sched)
    idx_rng, noise_rng, eos = random.Random(1), random.Random(2), tok.eos_token_id
    p_noise = 0.0 if cands is None else a.p_noise
    for s in range(a.ft_steps):
        idx = idx_rng.sample(range(len(enc)), a.data_rows)
        traces = []
        for i in idx:
            p, t = enc[i]
            acts, noise = list(t), [False] * len(t)
            if cands is not None:
                acts, noise = candidate_noise(t, bk, p_noise, cands[i], noise_rng)
            traces.append(data_trace(p, t, bk, eos, acts, noise))
        if sm and s >= a.sm_warmup:  # on-policy rollouts of the same prompts, T = 1
            dp = DecodeParams(temperature=1.0, max_actions=24, max_backspaces=4, seed=s)
            for r in torch_generate(model, [enc[i][0] for i in idx], dp, bk, eos):
                traces.append(build_inputs(r.prompt_ids, r.action_ids, bk, eos_id=eos, from_data=False))
        m = tr.step(traces)
    print(f"{arm}: final loss {m['loss/total']:.3f}", flush=True)
    return model


def evaluate(model, tok, qs, a) -> dict:
    from types import SimpleNamespace

    from sm_dist.eval.torch_decode import evaluate_torch

    ex = [SimpleNamespace(prompt=q["prompt"], answer=q["answer"]) for q in qs]
    out = {}
    for name, kw in DECODINGS.items():
        r = evaluate_torch(model, tok, ex, max_actions=24, max_backspaces=4, **kw)
        r.pop("examples")
        out[name] = r
    return out


def _brief(ev: dict) -> dict:
    return {"search": ev["search"]["accuracy"], "sampled": ev["sample"]["accuracy"],
            "pass_at_4": ev["sample"]["pass_at_k"], "no_bkspc": ev["greedy_no_bkspc"]["accuracy"],
            "recovery": ev["recovery"]["accuracy"], "recovery_plausible": ev["recovery_plausible"]["accuracy"],
            "bkspc_precision_sampled": ev["sample"]["bkspc_precision"],
            "repeat_cycles_sampled": ev["sample"]["repeat_cycles"], "cap_hits_sampled": ev["sample"]["bkspc_cap_hits"]}  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/arith_gpu"))
    ap.add_argument("--preset", choices=list(PRESETS), default="h100")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    ap.add_argument("--c", type=float, default=1e-2, help="chi^2 weight of the sm arms")
    ap.add_argument("--p-noise", type=float, default=0.25)
    ap.add_argument("--sm-lambda", type=float, default=0.5)
    ap.add_argument("--sm-warmup", type=int, default=0, help="BC-only steps of the sm arms")
    ap.add_argument("--truncated-value", choices=["bootstrap", "complete"], default="bootstrap")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--noise-top-k", type=int, default=5)
    ap.add_argument("--attn", default="auto", choices=["auto", "flex", "split", "sdpa"])
    ap.add_argument(
        "--pretrain-minutes", type=float, default=3.0, help="pretraining stops there at the latest"
    )
    ap.add_argument("--budget-minutes", type=float, default=9.5, help="no arm starts that would end past it")
    for k in PRESETS["h100"]:  # override any preset value
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    a = ap.parse_args(argv)
    global ATTN
    ATTN = a.attn
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    run(a)


def run(a) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sm_dist.core.tiny import make_tiny_model
    from sm_dist.core.vocab import get_bkspc_id

    t0, dev = time.perf_counter(), torch.device(a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    qs = questions(a)
    init = make_tiny_model(a.out / "init", hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads)
    tok = AutoTokenizer.from_pretrained(init)
    bk = get_bkspc_id(tok)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters on {dev}", flush=True)
    res = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "params": n_params,
    }
    res["minutes"] = {"pretrain": pretrain(model, tok, qs["pre"], a, bk)}
    base_dir = a.out / "pretrained" / "model"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    res["pretrained"] = {
        "val": _brief(evaluate(model, tok, qs["val"], a)),
        "test": _brief(evaluate(model, tok, qs["test"], a)),
    }
    enc = encode(tok, qs["ft"])
    last = 0.0
    for arm in a.arms:
        t = time.perf_counter()
        if (t - t0) / 60 + last > a.budget_minutes:
            print(f"{arm}: skipped (would end past --budget-minutes {a.budget_minutes})", flush=True)
            res.setdefault("skipped", []).append(arm)
            continue
        cands = arm_noise(arm, tok, enc, qs["ft"], model, a, bk)
        ft = finetune(arm, base_dir, tok, enc, qs["ft"], a, bk, cands, dev)
        d = a.out / arm / "seed0"
        ft.save_pretrained(d / "model")
        tok.save_pretrained(d / "model")
        ev = {"val": evaluate(ft, tok, qs["val"], a), "test": evaluate(ft, tok, qs["test"], a)}
        (d / "eval.json").write_text(json.dumps(ev, indent=1))
        res[arm] = {"val": _brief(ev["val"]), "test": _brief(ev["test"])}
        res["minutes"][arm] = last = (time.perf_counter() - t) / 60
        print(f"{arm}: test sampled {res[arm]['test']['sampled']:.3f} search {res[arm]['test']['search']:.3f} "
              f"({res['minutes'][arm]:.1f} min)", flush=True)  # fmt: skip
        if arm == "mle":  # the gate: the finetune must teach the task (issue 23)
            gain = 100 * (res["mle"]["val"]["search"] - res["pretrained"]["val"]["search"])
            res["gate"] = {"mle_gain_points_val": gain, "passed": gain >= 5.0}
            print(f"gate: MLE gains {gain:.1f} points over the base on validation "
                  f"({'passed' if gain >= 5 else 'NOT passed: lengthen --ft-steps'})", flush=True)  # fmt: skip
        res["minutes"]["total"] = (time.perf_counter() - t0) / 60
        (a.out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("settings",)}, indent=1))
    if "mle" in res and "sm_plausible" in res:
        print(
            f"sm_minus_mle_sampled_accuracy: {res['sm_plausible']['test']['sampled'] - res['mle']['test']['sampled']:.4f}"
        )


if __name__ == "__main__":
    main()
