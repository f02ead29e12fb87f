"""`sm-dist eval`: metric functions on hand-made traces, and end-to-end runs on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice

import pytest

from sm_dist.eval.arith_eval import count_bkspc_fixes, score_example, summarize

DATA = "/work/shared/data/arith/add_or_sub_in_base.train-easy.jsonl"
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
}


@pytest.mark.slow
@pytest.mark.parametrize("backspace", [True, False])
def test_evaluate_tiny_model(tiny_model_dir, data_file, engine, backspace):
    from sm_dist.eval.arith_eval import evaluate

    s = evaluate(tiny_model_dir, data_file, backspace=backspace, on_bad="skip", max_actions=16, engine=engine)
    assert set(s) >= KEYS
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
def test_cli_eval(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "sm_dist", "eval", "--model", str(tiny_model_dir), "--data", str(data_file)]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "eval.jsonl:4" in bad.stderr
    ok = subprocess.run(
        [
            *cmd,
            "--on-bad",
            "skip",
            "--limit",
            "4",
            "--max-actions",
            "8",
            "--backspace",
            "off",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "| accuracy |" in ok.stdout
    s = json.loads(out.read_text())
    assert s["n"] == 4 and s["skipped"] == 1 and s["backspace"] == "off"
