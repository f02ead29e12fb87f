"""data.train_path through files, globs, `datasets` folders and hub ids (sm_dist.data.sources), and chat
rows rendered with the tokenizer's own template (sm_dist.data.chat)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sm_dist.data.datasets import encode_examples, load_examples
from sm_dist.errors import DataError

# a template in the tiny arithmetic alphabet: BOS first, as Llama-2's own template has it
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}? {% else %}. {% endif %}"
    "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} , {% endif %}"
)
CHAT = [
    {
        "messages": [
            {"role": "user", "content": "In base 7, what is 1 + 2?"},
            {"role": "assistant", "content": "3"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is 4 - 1?"},
            {"role": "assistant", "content": "3"},
        ]
    },
]
MULTI = {
    "messages": [
        {"role": "user", "content": "what is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "and 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
}


@pytest.fixture(scope="module")
def chat_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = TEMPLATE
    return tok


def test_save_to_disk_chat_rows_render_with_the_template(tmp_path, chat_tok):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(CHAT), "test": Dataset.from_list(CHAT[:1])}).save_to_disk(
        tmp_path / "ds"
    )
    ex, report = load_examples(tmp_path / "ds", split="train")
    assert report.kept == 2 and [e.answer for e in ex] == ["3", "3"]
    enc, _ = encode_examples(ex, chat_tok, 64, 8)
    for e, row in zip(enc, CHAT, strict=True):
        want = chat_tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        assert e.prompt_ids == want
        assert e.prompt_ids[0] == chat_tok.bos_token_id and e.prompt_ids.count(chat_tok.bos_token_id) == 1
        assert e.target_ids == [*chat_tok.encode("3", add_special_tokens=False), chat_tok.eos_token_id]
    assert len(load_examples(tmp_path / "ds", split="test")[0]) == 1
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'dev'.*Fix: set data.split"):
        load_examples(tmp_path / "ds", split="dev")


def test_several_assistant_turns_are_refused_with_the_reason(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [*CHAT, MULTI]))
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert f"{p}:3" in msg and "multi_assistant" in msg and "split it into one row per assistant turn" in msg
    ex, report = load_examples(p, on_bad="skip")
    assert len(ex) == 2 and report.skipped == {"multi_assistant": 1}


def test_a_chat_row_needs_a_chat_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps(CHAT[0]) + "\n")
    ex, _ = load_examples(p)
    with pytest.raises(DataError, match="has no chat template"):
        encode_examples(ex, AutoTokenizer.from_pretrained(tiny_model_dir), 64, 8)


def test_arrow_csv_parquet_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"what is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    (tmp_path / "d.csv").write_text(
        "prompt,answer\n" + "".join(f'"{r["prompt"]}",{r["answer"]}\n' for r in rows)
    )
    for name in ("d.arrow", "d.parquet", "d.csv"):
        ex, report = load_examples(tmp_path / name)
        assert [(e.prompt, e.answer) for e in ex] == [(r["prompt"], r["answer"]) for r in rows], name
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in range(2):
        (parts / f"p{k}.jsonl").write_text(json.dumps(rows[k]) + "\n" + ("{bad\n" if k else ""))
    ex, report = load_examples(str(parts / "*.jsonl"), on_bad="skip")
    assert len(ex) == 2 and report.first_lines == {"malformed_json": ["p1.jsonl:2"]}
    with pytest.raises(DataError, match="matches no file"):
        load_examples(str(parts / "*.parquet"))


def test_a_dataset_id_missing_offline_is_one_line_naming_the_cache(tmp_path, tiny_model_dir):
    """A hub id that the (empty) cache does not hold, offline: one line naming HF_HUB_OFFLINE and the
    cache; through `sm-dist train`'s checks (before Ray starts), with exit code 2 and no traceback."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "train", "configs/tiny-cpu.yaml", "data.train_path=nobody/nothing",
         f"run.run_dir={tmp_path / 'run'}",
         f"model.dir={tiny_model_dir}"],
        env=env, capture_output=True, text=True, cwd=root,
    )  # fmt: skip
    line = out.stderr.strip()
    assert out.returncode == 2 and "\n" not in line and "Traceback" not in line, out.stderr
    assert line.startswith("sm-dist train: nobody/nothing: is not a local path")
    assert "HF_HUB_OFFLINE" in line and str(tmp_path / "hf" / "hub") in line
