"""Bad inputs to every command end in one clear line, never a traceback (issue 12).

Each case runs `python -m sm_dist ...` in a subprocess on files it breaks on purpose, then asserts:
* exit code 2;
* no "Traceback" anywhere on stderr;
* exactly one line of stderr starts with `sm-dist <command>:`; it is the last line, names the input
  (the `names` fragments) and holds "Fix:";
* every other stderr line is expected noise: our own log lines (`[sm-dist] ...`, e.g. the count of
  skipped rows) or a known library start-up line (`NOISE`);
* nothing under the test's folder was written, changed or deleted (a snapshot of every path, size and
  mtime before and after; the broken inputs are made before the snapshot).
Nothing here starts Ray or vLLM: every bad input is caught before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
NOISE = re.compile(r"^(\[sm-dist\] |Triton is installed, but doesn't include CPU backend)")
GOOD_ROW = {"prompt": "In base 10, what is 1 + 2?", "answer": "3"}


@dataclass
class Case:
    id: str
    setup: Callable[[Path, Path], list[str]]  # (tmp folder, a good tiny model) -> argv after `sm_dist`
    names: tuple[str, ...]  # fragments the error line must hold (the input, the key, the problem)


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _train(tmp: Path, *over: str) -> list[str]:
    return ["train", TINY, f"run.run_dir={tmp / 'run'}", "run.progress=false", *over]


def _model_copy(tmp: Path, model: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(model, tmp / name))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# ---- set-ups ------------------------------------------------------------------------------------------


def malformed_line(tmp, model):
    data = _jsonl(tmp / "bad.jsonl", [GOOD_ROW, '{"prompt": "x", "answer": '])
    return _train(tmp, f"model.dir={model}", f"data.train_path={data}", "data.on_bad=error")


def overlong_prompt(tmp, model):
    data = _jsonl(tmp / "long.jsonl", [GOOD_ROW, {"prompt": "1 + " * 40, "answer": "2"}])
    return _train(tmp, f"model.dir={model}", f"data.train_path={data}", "data.on_bad=error")


def non_utf8(tmp, model):
    (tmp / "latin1.jsonl").write_bytes(
        json.dumps(GOOD_ROW).encode() + b'\n{"prompt": "caf\xe9", "answer": "1"}\n'
    )
    return _train(tmp, f"model.dir={model}", f"data.train_path={tmp / 'latin1.jsonl'}", "data.on_bad=error")


def bkspc_text(tmp, model):
    data = _jsonl(tmp / "bk.jsonl", [GOOD_ROW, {"prompt": "1 + 1 <bkspc>", "answer": "2"}])
    return _train(tmp, f"model.dir={model}", f"data.train_path={data}", "data.on_bad=error")


def every_row_malformed(tmp, model):
    data = _jsonl(tmp / "junk.jsonl", ["{nope", "[1, 2]", json.dumps({"prompt": "x"})])
    return _train(tmp, f"model.dir={model}", f"data.train_path={data}", "data.on_bad=skip")


def every_prompt_too_long(tmp, model):
    data = _jsonl(tmp / "long.jsonl", [{"prompt": "1 + " * 40, "answer": str(i)} for i in range(3)])
    return _train(tmp, f"model.dir={model}", f"data.train_path={data}", "data.on_bad=skip")


def empty_data(tmp, model):
    (tmp / "empty.jsonl").write_text("\n\n")
    return _train(tmp, f"model.dir={model}", f"data.train_path={tmp / 'empty.jsonl'}")


def data_is_a_folder(tmp, model):
    (tmp / "d.jsonl").mkdir()
    return _train(tmp, f"model.dir={model}", f"data.train_path={tmp / 'd.jsonl'}")


def corrupt_parquet(tmp, model):
    (tmp / "d.parquet").write_bytes(b"PAR1 this is not parquet")
    return _train(tmp, f"model.dir={model}", f"data.train_path={tmp / 'd.parquet'}")


def one_answer_token(tmp, model):
    data = _jsonl(tmp / "same.jsonl", [{"prompt": f"{i} + 0", "answer": "7"} for i in range(4)])
    return _train(tmp, f"model.dir={model}", f"data.train_path={data}")


def model_without_tokenizer(tmp, model):
    m = _model_copy(tmp, model)
    for f in m.glob("tokenizer*"):
        f.unlink()
    return _train(tmp, f"model.dir={m}")


def model_without_bkspc(tmp, model):
    from sm_dist.core.tiny import ARITH_ALPHABET, train_tokenizer

    m = _model_copy(tmp, model)
    train_tokenizer(None, alphabet=ARITH_ALPHABET, with_bkspc=False).save_pretrained(m)
    return _train(tmp, f"model.dir={m}")


def truncated_weights(tmp, model):
    m = _model_copy(tmp, model)
    _truncate(m / "model.safetensors", 5000)
    return _train(tmp, f"model.dir={m}")


def garbage_weights(tmp, model):
    m = _model_copy(tmp, model)
    (m / "model.safetensors").write_bytes(b"\xff" * 64)
    return _train(tmp, f"model.dir={m}")


def model_without_config(tmp, model):
    m = _model_copy(tmp, model)
    (m / "config.json").unlink()
    return _train(tmp, f"model.dir={m}")


def unknown_override(tmp, model):
    return _train(tmp, "learner.lrr=1e-3")


def bad_yaml_config(tmp, model):
    (tmp / "c.yaml").write_text("learner: [unclosed\n")
    return ["train", str(tmp / "c.yaml")]


def resume_without_checkpoint(tmp, model):
    (tmp / "run").mkdir()
    return [*_train(tmp), "--resume", str(tmp / "run")]


def _run_with_checkpoint(tmp: Path, model: Path, *over: str) -> tuple[list[str], Path]:
    """A run directory as `sm-dist train` leaves it: config.yaml, model/, one complete checkpoint."""
    from sm_dist.config import dump_config, load_config
    from sm_dist.learner import checkpoint as ckpt
    from tests.unit.test_checkpoint import tiny_state

    run = tmp / "run"
    argv = _train(tmp, *over)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config(TINY, argv[2:])))
    _model_copy(tmp, model, "run/model")
    c = ckpt.begin(run, 4)
    _model_copy(tmp, model, f"run/checkpoints/{c.name}/model")
    tiny_state(c, 4)
    return [*argv, "--resume", str(run)], ckpt.commit(c, {"step": 4, "version": 1}, run, keep_last=2)


def resume_with_corrupt_run_state(tmp, model):
    argv, c = _run_with_checkpoint(tmp, model)
    (c / "run_state.json").write_text('{"step": 4,')
    return argv


def resume_with_truncated_weights(tmp, model):
    argv, c = _run_with_checkpoint(tmp, model)
    _truncate(c / "model" / "model.safetensors", 3000)
    return argv


def resume_with_corrupt_state(tmp, model):
    argv, c = _run_with_checkpoint(tmp, model)
    (c / "state" / "__0_0.distcp").write_bytes(b"\x00" * 100)
    return argv


def resume_an_old_checkpoint_format(tmp, model):
    argv, c = _run_with_checkpoint(tmp, model)
    (c / "learner_state.json").write_text(json.dumps({"step": 4, "skipped": 0, "sequences": 128}))
    return argv


def resume_changing_the_model_shape(tmp, model):
    argv, _ = _run_with_checkpoint(tmp, model)
    return [*argv, "model.tiny.hidden_size=256", "model.tiny.num_layers=4"]  # overrides after --resume


def resume_with_other_buffer_shards(tmp, model):
    """A run written with buffer.shards=2 (two shard folders, each with a manifest), resumed with 1."""
    from sm_dist.buffer import ReplayBuffer, rows_to_batch

    argv, _ = _run_with_checkpoint(tmp, model, "buffer.shards=2")
    row = {"sample_id": "w0-0", "prompt_ids": [1], "action_ids": [2], "final_ids": [2], "source": "model",
           "policy_version": 0, "logprobs": [-1.0], "finish_reason": "eos", "worker_id": "w0"}  # fmt: skip
    for k in (0, 1):
        ReplayBuffer(str(tmp / "run"), 100, 1 << 20, shard=k).add(
            rows_to_batch([{**row, "sample_id": f"w0-{k}"}])
        )
    return [*argv, "buffer.shards=1"]


def fresh_run_on_a_used_run_dir(tmp, model):
    argv, _ = _run_with_checkpoint(tmp, model)
    (tmp / "run" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    return argv[: argv.index("--resume")]  # the same command without --resume


def resume_with_a_differing_config_file(tmp, model):
    """The run's own config file, resolved as the run saved it, but with another run.total_steps."""
    from sm_dist.config import dump_config, load_config

    argv, _ = _run_with_checkpoint(tmp, model)
    over = argv[2 : argv.index("--resume")]
    (tmp / "c.yaml").write_text(dump_config(load_config(TINY, [*over, "run.total_steps=777"])))
    return [argv[0], str(tmp / "c.yaml"), *argv[2:]]


def train_without_a_config(tmp, model):
    return ["train", "run.total_steps=5"]


def one_answer_token_tiny_built_at_start(tmp, model):
    """The same with the model built at start (the default): checked with the tokenizer it will get."""
    data = _jsonl(tmp / "same.jsonl", [{"prompt": f"{i} + 0", "answer": "7"} for i in range(4)])
    return _train(tmp, "model.dir=null", "model.make_tiny_if_missing=true", f"data.train_path={data}")


def empty_prompts_without_bos(tmp, model):
    rows = [{"text": f"In base 10, what is {i} + 1? {i + 1}"} for i in range(4)]
    data = _jsonl(tmp / "t.jsonl", rows)
    return _train(
        tmp,
        f"model.dir={model}",
        f"data.train_path={data}",
        "data.format.text_field=text",
        "data.max_answer_len=48",
        "rollout.engine.max_model_len=160",
    )


def engine_longer_than_the_model(tmp, model):
    return _train(tmp, f"model.dir={model}", "rollout.engine.max_model_len=4096")


_HELD: list = []  # sockets kept open while the commands run


def api_port_taken(tmp, model):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _HELD.append(s)
    return _train(tmp, f"model.dir={model}", f"run.api_port={s.getsockname()[1]}")


def run_dir_is_a_file(tmp, model):
    (tmp / "afile").write_text("x")
    return ["train", TINY, f"run.run_dir={tmp / 'afile' / 'run'}", f"model.dir={model}", "run.progress=false"]


def more_workers_than_prompts(tmp, model):
    data = _jsonl(tmp / "two.jsonl", [GOOD_ROW, {"prompt": "In base 10, what is 2 + 2?", "answer": "4"}])
    return _train(tmp, f"model.dir={model}", f"data.train_path={data}", "rollout.num_workers=3")


def data_is_a_plain_folder(tmp, model):
    (tmp / "mydata").mkdir()
    (tmp / "mydata" / "notes.txt").write_text("not data\n")
    return _train(tmp, f"model.dir={model}", f"data.train_path={tmp / 'mydata'}")


def eval_missing_model(tmp, model):
    data = _jsonl(tmp / "d.jsonl", [GOOD_ROW])
    return ["eval", "--model", str(tmp / "no-model"), "--data", data]


def eval_missing_data(tmp, model):
    return ["eval", "--model", str(model), "--data", str(tmp / "missing.jsonl")]


def eval_empty_data(tmp, model):
    (tmp / "e.jsonl").write_text("")
    return ["eval", "--model", str(model), "--data", str(tmp / "e.jsonl")]


def eval_limit_zero(tmp, model):
    return ["eval", "--model", str(model), "--data", _jsonl(tmp / "d.jsonl", [GOOD_ROW]), "--limit", "0"]


def eval_limit_negative(tmp, model):
    return ["eval", "--model", str(model), "--data", _jsonl(tmp / "d.jsonl", [GOOD_ROW]), "--limit", "-1"]


def eval_model_without_bkspc(tmp, model):
    argv = model_without_bkspc(tmp, model)
    return ["eval", "--model", argv[-1].split("=", 1)[1], "--data", _jsonl(tmp / "d.jsonl", [GOOD_ROW])]


def status_missing_dir(tmp, model):
    return ["status", str(tmp / "nope")]


def status_corrupt_config(tmp, model):
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("run: {total_steps: [\n")
    return ["status", str(tmp / "run")]


def status_corrupt_summary(tmp, model):
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("run: {total_steps: 5}\n")
    (tmp / "run" / "summary.json").write_text("{")
    return ["status", str(tmp / "run")]


def plot_missing_dir(tmp, model):
    return ["plot", str(tmp / "nope")]


def add_bkspc_missing_dir(tmp, model):
    return ["add-bkspc", str(tmp / "nope"), str(tmp / "out")]


def tiny_bad_head_size(tmp, model):
    return ["make-tiny-model", str(tmp / "out"), "--hidden-size", "100", "--num-heads", "3"]


def tiny_missing_text(tmp, model):
    return ["make-tiny-model", str(tmp / "out"), "--text", str(tmp / "nope.txt")]


def text_metrics_missing_model(tmp, model):
    return ["text-metrics", "--model", str(tmp / "nope"), "--data", _jsonl(tmp / "d.jsonl", [GOOD_ROW])]


CASES = [
    Case("malformed_line", malformed_line, ("bad.jsonl:2", "malformed_json", "data.on_bad=skip")),
    Case(
        "overlong_prompt",
        overlong_prompt,
        ("long.jsonl: example 2", "data.max_prompt_len", "data.on_bad=skip"),
    ),
    Case("non_utf8", non_utf8, ("latin1.jsonl:2", "not_utf8", "data.on_bad=skip")),
    Case("bkspc_text", bkspc_text, ("bk.jsonl:2", "bkspc_text", "data.on_bad=skip")),
    Case("every_row_malformed", every_row_malformed, ("data.train_path", "junk.jsonl", "malformed_json")),
    Case(
        "every_prompt_too_long",
        every_prompt_too_long,
        ("long.jsonl", "3 overlong_prompt", "data.max_prompt_len"),
    ),
    Case("empty_data", empty_data, ("data.train_path", "empty.jsonl", "holds no rows")),
    Case("data_is_a_folder", data_is_a_folder, ("d.jsonl", "is a folder")),
    Case("corrupt_parquet", corrupt_parquet, ("d.parquet", "not a readable parquet")),
    Case("one_answer_token", one_answer_token, ("data.noise", "fewer than 2 distinct tokens")),
    Case("model_without_tokenizer", model_without_tokenizer, ("model.dir", "no loadable tokenizer")),
    Case("model_without_bkspc", model_without_bkspc, ("model.dir", "<bkspc>", "add-bkspc")),
    Case("truncated_weights", truncated_weights, ("model.dir", "model.safetensors", "truncated")),
    Case("garbage_weights", garbage_weights, ("model.dir", "model.safetensors")),
    Case("model_without_config", model_without_config, ("model.dir", "config.json")),
    Case("unknown_override", unknown_override, ("learner.lrr",)),
    Case("bad_yaml_config", bad_yaml_config, ("c.yaml", "not valid YAML")),
    Case("resume_without_checkpoint", resume_without_checkpoint, ("--resume", "no completed checkpoint")),
    Case(
        "resume_corrupt_run_state",
        resume_with_corrupt_run_state,
        ("--resume", "step-00000004", "run_state.json"),
    ),
    Case("resume_truncated_weights", resume_with_truncated_weights, ("--resume", "model/model.safetensors")),
    Case("resume_corrupt_state", resume_with_corrupt_state, ("--resume", "state/__0_0.distcp")),
    Case(
        "resume_old_checkpoint_format",
        resume_an_old_checkpoint_format,
        ("step-00000004", "format version 1", "start a fresh run dir"),
    ),
    Case(
        "resume_changes_model_shape",
        resume_changing_the_model_shape,
        ("model.tiny.hidden_size", "--resume cannot change"),
    ),
    Case(
        "resume_with_other_buffer_shards",
        resume_with_other_buffer_shards,
        (
            "buffer.shards",
            "written with buffer.shards=2",
            "asks for buffer.shards=1",
            "resume with buffer.shards=2",
        ),
    ),
    Case(
        "fresh_run_on_a_used_run_dir",
        fresh_run_on_a_used_run_dir,
        (
            "run.run_dir",
            "already holds a run",
            "1 checkpoint",
            "2 metric rows",
            "--resume",
            "run.overwrite=true",
        ),
    ),
    Case(
        "resume_with_a_differing_config_file",
        resume_with_a_differing_config_file,
        ("--resume", "c.yaml differs", "run.total_steps (", "777 in the file)", "run.total_steps=777"),
    ),
    Case("train_without_a_config", train_without_a_config, ("CONFIG", "--resume RUN_DIR")),
    Case(
        "one_answer_token_tiny_built_at_start",
        one_answer_token_tiny_built_at_start,
        ("data.noise", "fewer than 2 distinct tokens"),
    ),
    Case("empty_prompts_without_bos", empty_prompts_without_bos, ("data.format.prompt_chars", "0 tokens")),
    Case(
        "engine_longer_than_the_model",
        engine_longer_than_the_model,
        ("rollout.engine.max_model_len", "4096 exceeds the model's 512 positions"),
    ),
    Case("api_port_taken", api_port_taken, ("run.api_port", "cannot listen", "another run.api_port")),
    Case("run_dir_is_a_file", run_dir_is_a_file, ("run.run_dir", "afile is a file")),
    Case("more_workers_than_prompts", more_workers_than_prompts, ("rollout.num_workers", "2 usable prompts")),
    Case("data_is_a_plain_folder", data_is_a_plain_folder, ("mydata", "is a folder", "save_to_disk")),
    Case("eval_missing_model", eval_missing_model, ("--model", "no-model", "does not exist")),
    Case("eval_missing_data", eval_missing_data, ("missing.jsonl", "does not exist")),
    Case("eval_empty_data", eval_empty_data, ("--data", "e.jsonl", "holds no rows")),
    Case("eval_limit_zero", eval_limit_zero, ("--limit 0",)),
    Case("eval_limit_negative", eval_limit_negative, ("--limit -1",)),
    Case("eval_model_without_bkspc", eval_model_without_bkspc, ("--model", "<bkspc>")),
    Case("status_missing_dir", status_missing_dir, ("nope", "does not exist")),
    Case("status_corrupt_config", status_corrupt_config, ("config.yaml", "not valid YAML")),
    Case("status_corrupt_summary", status_corrupt_summary, ("summary.json", "not valid JSON")),
    Case("plot_missing_dir", plot_missing_dir, ("nope", "does not exist")),
    Case("add_bkspc_missing_dir", add_bkspc_missing_dir, ("nope", "does not exist")),
    Case("tiny_bad_head_size", tiny_bad_head_size, ("--hidden-size 100", "--num-heads 3")),
    Case("tiny_missing_text", tiny_missing_text, ("--text", "nope.txt")),
    Case("text_metrics_missing_model", text_metrics_missing_model, ("--model", "nope")),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def run_cli(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    full.pop("SM_DIST_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "sm_dist", *argv], capture_output=True, text=True, timeout=180, cwd=cwd,
        env={**full, **env},
    )  # fmt: skip


def assert_one_clear_line(out: subprocess.CompletedProcess, command: str, names: tuple[str, ...]) -> str:
    err = out.stderr
    assert out.returncode == 2, f"exit {out.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith(f"sm-dist {command}: ")]
    assert len(ours) == 1 and lines[-1] == ours[0], err[-3000:]
    assert [ln for ln in lines[:-1] if not NOISE.match(ln)] == [], err[-3000:]
    line = ours[0]
    assert "Fix:" in line, line
    for fragment in names:
        assert fragment in line, f"{fragment!r} not in: {line}"
    return line


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory, tiny_model_dir):
    """Every selected case set up in its own folder, its command started at once: the commands (each a
    Python start-up and a preflight, seconds of imports) run side by side, one per core, while the
    tests below take their results in turn. Case id -> (folder, argv, snapshot before, future)."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = {
        item.callspec.params["case"].id
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    out = {}
    for case in (c for c in CASES if c.id in wanted):
        tmp = tmp_path_factory.mktemp(case.id)
        argv = case.setup(tmp, tiny_model_dir)
        out[case.id] = (tmp, argv, _snapshot(tmp), pool.submit(run_cli, argv, cwd=tmp))
    yield out
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_clear_line(case, launched):
    tmp, argv, before, result = launched[case.id]
    assert_one_clear_line(result.result(), argv[0], case.names)
    assert _snapshot(tmp) == before, "the command wrote, changed or deleted files"


def test_debug_shows_the_traceback(tmp_path):
    for out in (
        run_cli(["--debug", "plot", str(tmp_path / "nope")], cwd=tmp_path),
        run_cli(["plot", str(tmp_path / "nope")], cwd=tmp_path, SM_DIST_DEBUG="1"),
    ):
        assert out.returncode == 1 and "Traceback" in out.stderr and "UserError" in out.stderr


def test_an_internal_bug_keeps_its_traceback(monkeypatch):
    from sm_dist import cli
    from sm_dist.cli import analysis

    def bug(args):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(analysis, "_plot", bug)  # `plot`'s handler, bound when main builds the parser
    monkeypatch.setattr(
        "sm_dist.service.logs.setup_logging", lambda *a, **k: None
    )  # leave the session's logging as is
    with pytest.raises(KeyError, match="a bug of ours"):
        cli.main(["plot", "anything"])


def test_overrides_may_follow_resume():
    from sm_dist.cli import parse_args

    args = parse_args(["train", "c.yaml", "a.b=1", "--resume", "RUN", "c.d=2", "e.f=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"] and args.resume == "RUN"
    with pytest.raises(SystemExit):
        parse_args(["train", "c.yaml", "--resume", "RUN", "--nope"])
