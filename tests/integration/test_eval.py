"""`sm-dist eval`: metric functions on hand-made traces, and end-to-end runs on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from sm_dist.errors import ModelError, UserError
from sm_dist.eval.arith_eval import count_bkspc_fixes, score_example, summarize

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "configs" / "data" / "arith" / "add_or_sub_in_base.heldout.jsonl"  # the bundled held-out split
BK, EOS = 99, 98


def test_metric_functions_on_hand_made_traces():
    # reference "1 2 eos" = [1, 2, EOS]
    assert count_bkspc_fixes([1, 5, BK, 2, EOS], BK, [1, 2, EOS]) == 1  # deleted wrong 5 at pos 1
    assert count_bkspc_fixes([1, 2, BK, 2, EOS], BK, [1, 2, EOS]) == 0  # deleted the correct 2
    assert count_bkspc_fixes([1, 2, 3, 4, BK, BK, EOS], BK, [1, 2, EOS]) == 2  # beyond the reference
    assert count_bkspc_fixes([BK, 1], BK, [1]) == 0  # no-op at the boundary

    p = "In base 7, what is 25 + -3?"
    good = score_example(p, "22", " 22 ", [2, 2, EOS], BK, [2, 2, EOS])
    fixed = score_example(p, "22", "22", [2, 5, BK, 2, EOS], BK, [2, 2, EOS])
    bad = score_example(p, "22", "2z", [2, 7, EOS], BK, [2, 2, EOS], finish_reason="length")
    other = score_example("hello?", "x", "y", [1, 1, 1, 1], BK, [1, EOS])
    assert good.correct and fixed.correct and not bad.correct and not other.correct
    assert (good.base, good.malformed, bad.malformed, other.base, other.malformed) == (
        7,
        False,
        True,
        None,
        None,
    )
    assert fixed.num_backspaces == 1 and fixed.bkspc_fixes == 1

    s = summarize([good, fixed, bad, other], skipped=3)
    assert s["n"] == 4 and s["accuracy"] == 0.5 and s["skipped"] == 3
    assert s["malformed_rate"] == pytest.approx(1 / 3)
    assert s["bkspc_rate"] == pytest.approx(1 / 15)
    assert s["answers_using_bkspc"] == 0.25 and s["bkspc_fixes"] == 1
    assert s["max_actions"] == 5 and s["mean_actions"] == pytest.approx(15 / 4)
    assert s["max_answer_chars"] == 2
    assert s["per_base"] == {"7": {"n": 3, "accuracy": pytest.approx(2 / 3)}}
    assert summarize([other])["malformed_rate"] is None
    assert s["questions"] == 4 and s["pass_at_k"] == 0.5 and s["k"] == 1  # no question_index: 1 each
    assert s["bkspc_cap_hits"] == 0 and s["length_cap_hits"] == 1  # `bad` finished on "length"


def test_summarize_pass_at_k_and_cap_hits():
    """Samples grouped by question_index: accuracy over samples, pass@k over questions."""
    from dataclasses import replace

    p = "In base 7, what is 25 + -3?"
    right = score_example(p, "22", "22", [2, 2, EOS], BK, [2, 2, EOS])
    wrong = score_example(p, "22", "21", [2, 1, EOS], BK, [2, 2, EOS])
    results = [  # question 0: 1 of 3 right; question 1: none; question 2: all
        replace(right, question_index=0, sample_index=0),
        replace(wrong, question_index=0, sample_index=1, finish_reason="action_cap"),
        replace(wrong, question_index=0, sample_index=2),
        replace(wrong, question_index=1, sample_index=0, finish_reason="length"),
        replace(wrong, question_index=1, sample_index=1, finish_reason="length"),
        replace(wrong, question_index=1, sample_index=2),
        *(replace(right, question_index=2, sample_index=i) for i in range(3)),
    ]
    s = summarize(results)
    assert s["n"] == 9 and s["questions"] == 3 and s["k"] == 3
    assert s["accuracy"] == pytest.approx(4 / 9) and s["pass_at_k"] == pytest.approx(2 / 3)
    assert s["bkspc_cap_hits"] == 1 and s["length_cap_hits"] == 2  # counted apart
    assert s["finish_reasons"] == {"eos": 6, "action_cap": 1, "length": 2}


def test_forced_error_prefixes_and_decoding_flags():
    from sm_dist.eval.decoding import decoding_params, forced_error_prefixes, resolve_decoding

    answers = [[1, 2, 3], [4], [2, 2]]
    pre = forced_error_prefixes(answers, seed=0)
    assert pre == forced_error_prefixes(answers, seed=0) and pre != forced_error_prefixes(answers, seed=1)
    for ans, p in zip(answers, pre, strict=True):
        i = len(p) - 1
        assert p[:i] == ans[:i] and p[i] != ans[i] and p[i] in {1, 2, 3, 4}
    assert resolve_decoding(None) == "search" and resolve_decoding("greedy_no_bkspc") == "greedy_no_bkspc"
    with pytest.raises(ValueError, match="unknown decoding 'beam'"):
        resolve_decoding("beam")
    sp = decoding_params("search")
    assert sp.temperature == 0.0 and sp.no_repeat_deleted and not sp.forbid_bkspc
    sp = decoding_params("sample", samples=4, seed=7)
    assert (sp.temperature, sp.samples_per_prompt, sp.seed, sp.no_repeat_deleted) == (1.0, 4, 7, False)
    assert decoding_params("greedy_no_bkspc").forbid_bkspc
    with pytest.raises(ValueError, match="--temperature 0.5"):
        decoding_params("greedy", temperature=0.5)


def test_cli_rejects_samples_for_deterministic_decoding(capsys):
    from sm_dist.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "m", "--data", "d.jsonl", "--decoding", "greedy", "--samples", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--samples 3" in err and "--decoding greedy" in err and "--decoding sample" in err


@pytest.fixture
def data_file(tmp_path):
    with open(DATA, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in islice(f, 8)]
    lines.insert(3, '{"prompt": "In base 3, what is 1 + 1?"')  # malformed json at line 4
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_on_bad_error_names_the_line(tiny_model_dir, data_file):
    from sm_dist.eval.arith_eval import evaluate

    with pytest.raises(ValueError, match=r"eval\.jsonl:4: malformed_json"):
        evaluate(tiny_model_dir, data_file, on_bad="error", engine=object())  # fails before generating


KEYS = {
    "accuracy",
    "n",
    "malformed_rate",
    "bkspc_rate",
    "answers_using_bkspc",
    "bkspc_fixes",
    "mean_actions",
    "max_actions",
    "mean_answer_chars",
    "max_answer_chars",
    "per_base",
    "skipped",
    "examples",
    "pass_at_k",
    "k",
    "questions",
    "bkspc_cap_hits",
    "length_cap_hits",
    "decoding",
    "temperature",
    "top_p",
    "samples",
    "seed",
    "forced_error",
}


@pytest.mark.slow
@pytest.mark.parametrize("decoding", ["search", "greedy_no_bkspc"])
def test_evaluate_tiny_model(tiny_model_dir, data_file, engine, decoding):
    from sm_dist.eval.arith_eval import evaluate

    s = evaluate(tiny_model_dir, data_file, decoding=decoding, on_bad="skip", max_actions=16, engine=engine)
    backspace = decoding != "greedy_no_bkspc"
    assert set(s) >= KEYS and s["decoding"] == decoding and s["temperature"] == 0.0
    assert s["pass_at_k"] == s["accuracy"] and s["k"] == 1 and s["questions"] == 8
    assert s["skipped"] == 1 and s["n"] == 8 and len(s["examples"]) == 8
    assert 0.0 <= s["accuracy"] <= 1.0
    assert s["accuracy"] == pytest.approx(sum(e["correct"] for e in s["examples"]) / 8)
    assert 0 < s["max_actions"] <= 16
    assert s["malformed_rate"] is not None and 0.0 <= s["malformed_rate"] <= 1.0
    assert sum(d["n"] for d in s["per_base"].values()) == 8
    if not backspace:
        assert s["bkspc_rate"] == 0.0 and s["answers_using_bkspc"] == 0.0 and s["bkspc_fixes"] == 0
    json.dumps(s)


@pytest.mark.slow
def test_sampled_eval_is_reproducible_and_forced_errors_stick(tiny_model_dir, data_file, engine):
    """One engine, several decodings: same seed -> same samples (whatever the batch split)."""
    from sm_dist.eval.arith_eval import evaluate

    def run(**kw):
        s = evaluate(tiny_model_dir, data_file, on_bad="skip", max_actions=12, engine=engine, **kw)
        return s, [(e["question_index"], e["sample_index"], e["prediction"]) for e in s["examples"]]

    s1, p1 = run(decoding="sample", samples=3, seed=1)
    _, p1b = run(decoding="sample", samples=3, seed=1, batch_size=3)
    _, p2 = run(decoding="sample", samples=3, seed=2)
    assert p1 == p1b and p1 != p2
    assert (s1["n"], s1["questions"], s1["k"], s1["samples"], s1["temperature"]) == (24, 8, 3, 3, 1.0)
    assert s1["pass_at_k"] >= s1["accuracy"]
    assert s1["bkspc_cap_hits"] == sum(e["finish_reason"] == "action_cap" for e in s1["examples"])
    assert s1["length_cap_hits"] == sum(e["finish_reason"] == "length" for e in s1["examples"])
    # Forced error without <bkspc>: the wrong token stays, every answer is wrong.
    ctl, _ = run(decoding="greedy_no_bkspc", force_error=True, seed=4)
    assert ctl["forced_error"] is True and ctl["accuracy"] == 0.0
    for e in ctl["examples"]:
        assert e["forced_prefix"] and e["prediction"].startswith(e["forced_prefix"])
        assert not e["answer"].startswith(e["forced_prefix"])
    srch, _ = run(decoding="search", force_error=True, seed=4)
    assert [e["forced_prefix"] for e in srch["examples"]] == [e["forced_prefix"] for e in ctl["examples"]]


def _checkpoint(run: Path, step: int, model_src: Path) -> Path:
    """A checkpoint folder as `sm-dist train` writes one (weights, states, manifest last)."""
    import shutil

    from sm_dist.learner.checkpoint import write_manifest
    from tests.unit.test_checkpoint import tiny_state

    c = run / "checkpoints" / f"step-{step:08d}"
    shutil.copytree(model_src, c / "model")
    tiny_state(c, step)
    (c / "run_state.json").write_text(json.dumps({"step": step}))
    write_manifest(c)
    return c


def test_model_argument_resolves_runs_and_checkpoints(tiny_model_dir, tmp_path):
    """--model: a model folder as is (RUN/model: a note that it is the start model), a checkpoint to its
    weights, a run to its newest intact checkpoint; caps from the run's config.yaml."""
    from sm_dist.eval.target import resolve_target

    run = tmp_path / "run"
    (run / "config.yaml").parent.mkdir()
    (run / "config.yaml").write_text("rollout:\n  max_actions: 24\n  max_backspaces: 4\n")
    c10, c20 = (_checkpoint(run, k, tiny_model_dir) for k in (10, 20))
    t = resolve_target(run)
    assert (t.model_dir, t.kind, t.defaults) == (
        c20 / "model",
        "run",
        {"max_actions": 24, "max_backspaces": 4},
    )
    t = resolve_target(c10)
    assert (t.model_dir, t.kind, t.defaults["max_actions"]) == (c10 / "model", "checkpoint", 24)
    w = next((c20 / "model").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-1] + b"x")  # a damaged newest checkpoint: the one before it
    t = resolve_target(run)
    assert t.model_dir == c10 / "model" and any("skipped" in n and "sha256" in n for n in t.notes)
    with pytest.raises(ModelError, match="damaged checkpoint"):
        resolve_target(c20)
    import shutil

    shutil.copytree(tiny_model_dir, run / "model")
    t = resolve_target(run / "model")
    assert t.kind == "model" and t.defaults == {} and "start model (before training)" in t.notes[0]
    with pytest.raises(ModelError, match="does not exist"):
        resolve_target(tmp_path / "nope")
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ModelError, match="no intact checkpoint"):
        resolve_target(run)


def test_engine_length_from_the_model(tmp_path):
    from sm_dist.eval.target import check_prompt_lengths, engine_max_len

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    assert engine_max_len(tmp_path, None) == 256 and engine_max_len(tmp_path, 128) == 128
    with pytest.raises(UserError, match="more than the model's 256 positions"):
        engine_max_len(tmp_path, 512)
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 100_000}))  # GPT-2's key; capped
    assert engine_max_len(tmp_path, None) == 2048
    with pytest.raises(UserError, match="example 1 has a 300-token prompt"):
        check_prompt_lengths([10, 300], 256, "d.jsonl")


@pytest.fixture(scope="module")
def model_256(tmp_path_factory):
    """A tiny model with 256 positions (fewer than the 512 once hard-coded in the eval engine)."""
    from sm_dist.core.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m256") / "model", max_position_embeddings=256)


@pytest.mark.slow
def test_cli_eval(model_256, data_file, tmp_path):
    """A 256-position model works; stdout is the table and nothing else; vLLM's output is in --log-file."""
    out, log = tmp_path / "result.json", tmp_path / "vllm.log"
    cmd = [sys.executable, "-m", "sm_dist", "eval", "--model", str(model_256), "--data", str(data_file)]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "eval.jsonl:4" in bad.stderr
    flags = ["--on-bad", "skip", "--limit", "4", "--max-actions", "8", "--decoding", "greedy_no_bkspc"]
    ok = subprocess.run(
        [*cmd, *flags, "--out", str(out), "--log-file", str(log)], capture_output=True, text=True, timeout=600
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = ok.stdout.splitlines()
    assert "| accuracy |" in lines[2] or "| accuracy |" in ok.stdout
    assert all(ln.startswith("|") or not ln for ln in lines), ok.stdout  # the table only
    assert str(log) in ok.stderr and log.stat().st_size > 0  # vLLM's chatter went to the log
    s = json.loads(out.read_text())
    assert s["n"] == 4 and s["skipped"] == 1 and s["backspace"] == "off" and s["max_model_len"] == 256
    assert s["decoding"] == "greedy_no_bkspc" and s["bkspc_rate"] == 0.0 and s["max_actions_cap"] == 8
    js = subprocess.run([*cmd, *flags[:4], "--json"], capture_output=True, text=True, timeout=600)
    assert js.returncode == 0, js.stderr[-2000:]
    assert json.loads(js.stdout)["n"] == 4  # the JSON alone on stdout
    assert "sm-dist-eval-" in js.stderr  # no --out, no --log-file: a temporary log, named on stderr


def test_the_tiny_config_starts_from_the_shipped_base_and_measures_the_heldout_split(tmp_path):
    """configs/tiny-cpu.yaml: the run's start model is a copy of models/tiny-arith-base (what its
    held-out 'before' measures); a start_from that is not a model folder is one ConfigError."""
    from sm_dist.config import ConfigError, load_config
    from sm_dist.data.prepare import prepare_model

    tiny = ROOT / "configs" / "tiny-cpu.yaml"
    cfg = load_config(tiny, [f"run.run_dir={tmp_path / 'run'}"])
    base = ROOT / "models" / "tiny-arith-base"
    assert cfg.model.start_from == str(base) and cfg.run.eval_path == str(DATA)
    prepare_model(cfg)
    start = tmp_path / "run" / "model" / "model.safetensors"
    assert start.read_bytes() == (base / "model.safetensors").read_bytes()
    assert json.loads((base / "base.json").read_text())["steps"] > 0  # its recipe travels with it
    with pytest.raises(ConfigError, match="model.start_from"):
        load_config(tiny, [f"run.run_dir={tmp_path / 'r2'}", f"model.start_from={tmp_path}"])
