"""Expert-data loading, encoding, augmentation and buffer rows: no silent drops, clear errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sm_dist.buffer.schema import rows_to_batch, validate_batch
from sm_dist.core.tiny import ARITH_ALPHABET, train_tokenizer
from sm_dist.core.traces import collapse
from sm_dist.core.vocab import get_bkspc_id
from sm_dist.data.datasets import (
    Example,
    augment,
    encode_examples,
    load_examples,
    make_data_rows,
)

GOOD = {"prompt": "In base 7, what is 25 + -3?", "answer": "22"}
MESSY_LINES = [
    json.dumps(GOOD),  # 1
    '{"prompt": "In base 2, what is 1 + 1?", "answer": ',  # 2 malformed json
    json.dumps({"prompt": "", "answer": "3"}),  # 3 empty prompt
    json.dumps({"answer": "3"}),  # 4 missing prompt
    "",  # 5 blank: not a row
    json.dumps({"prompt": "In base 9, what is 1 + 1?", "answer": 2}),  # 6 non-string answer
    json.dumps(["prompt", "answer"]),  # 7 not an object
    json.dumps(GOOD | {"answer": "   "}),  # 8 empty answer
    json.dumps({"prompt": "In base 3, what is 1 + 1?", "answer": "2", "extra": 1}),  # 9 good (extra ignored)
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(None, alphabet=ARITH_ALPHABET)


@pytest.fixture
def messy(tmp_path):
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(MESSY_LINES) + "\n")
    return path


def test_load_error_names_file_line_reason_and_fix(messy):
    with pytest.raises(ValueError, match=r"messy\.jsonl:2: malformed_json: .*data\.on_bad=skip"):
        load_examples(messy)


def test_load_skip_counts_every_bad_row_by_reason(messy):
    examples, report = load_examples(messy, on_bad="skip")
    assert [e.answer for e in examples] == ["22", "2"]
    assert report.rows_read == 8 and report.kept == 2
    assert report.skipped == Counter(
        malformed_json=1, empty=2, missing_field=1, non_string=1, not_an_object=1
    )
    assert report.first_lines == {
        "malformed_json": [2],
        "empty": [3, 8],
        "missing_field": [4],
        "non_string": [6],
        "not_an_object": [7],
    }
    assert "skipped 6" in report.summary() and "lines [3, 8]" in report.summary()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (3, "empty: field 'prompt' is empty"),
        (4, "missing_field: no field 'prompt'"),
        (6, "non_string: field 'answer' is int"),
    ],
)
def test_each_bad_row_kind_raises_with_its_line(tmp_path, line, reason):
    path = tmp_path / "one.jsonl"
    path.write_text(MESSY_LINES[0] + "\n" + "\n" * (line - 2) + MESSY_LINES[line - 1] + "\n")
    with pytest.raises(ValueError, match=f"one.jsonl:{line}: {reason}"):
        load_examples(path)


def test_load_parquet_custom_fields_and_limit(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["a", "b", None, "c"], "a": ["1", "2", "3", "4"]}), path)
    with pytest.raises(ValueError, match=r"d\.parquet:3: missing_field"):
        load_examples(path, prompt_field="q", answer_field="a")
    examples, report = load_examples(path, prompt_field="q", answer_field="a", on_bad="skip")
    assert examples == [Example("a", "1"), Example("b", "2"), Example("c", "4")]
    assert report.first_lines == {"missing_field": [3]}
    assert load_examples(path, prompt_field="q", answer_field="a", limit=2)[0] == examples[:2]


def test_load_text_modes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\n\nab\n")
    assert load_examples(path)[0] == [Example("", "hello world"), Example("", "ab")]
    with pytest.raises(ValueError, match=r"t\.txt:3: empty: .*prompt_chars=5"):
        load_examples(path, prompt_chars=5)
    examples, report = load_examples(path, prompt_chars=5, on_bad="skip")
    assert examples == [Example("hello", " world")] and report.skipped == Counter(empty=1)
    jpath = tmp_path / "t.jsonl"
    jpath.write_text(json.dumps({"text": "abcdef"}) + "\n")
    assert load_examples(jpath, text_field="text", prompt_chars=2)[0] == [Example("ab", "cdef")]


def test_unknown_suffix_asks_for_the_format(tmp_path):
    path = tmp_path / "d.xml"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="data.format"):
        load_examples(path)


def test_encode_appends_eos_and_applies_the_length_policy(tokenizer):
    eos = tokenizer.eos_token_id
    examples = [Example("1 + 1", "2"), Example("10 + 10 + 10", "30"), Example("1", "1111111")]
    with pytest.raises(
        ValueError, match=r"example 2: prompt is 12 tokens > max_prompt_len=6.*data\.max_prompt_len"
    ):
        encode_examples(examples, tokenizer, max_prompt_len=6, max_answer_len=4)
    encoded, report = encode_examples(examples, tokenizer, 6, 4, on_overlong="skip")
    assert [len(e.prompt_ids) for e in encoded] == [5]
    assert report.skipped == Counter(overlong_prompt=1, overlong_answer=1)
    assert report.first_lines == {"overlong_prompt": [2], "overlong_answer": [3]}
    encoded, report = encode_examples(examples, tokenizer, 6, 4, on_overlong="truncate_left")
    assert len(encoded) == 2 and report.skipped == Counter(overlong_answer=1)
    assert encoded[1].prompt_ids == tokenizer.encode("10 + 10 + 10", add_special_tokens=False)[-6:]
    assert encoded[1].target_ids == [*tokenizer.encode("30", add_special_tokens=False), eos]


def test_augment_collapses_to_target_and_make_rows_fit_the_schema(tokenizer):
    bkspc = get_bkspc_id(tokenizer)
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    examples = [Example(f"{i} + {i}", str(2 * i)) for i in range(50)]
    encoded, _ = encode_examples(examples, tokenizer, 16, 8)
    aug = augment(encoded, bkspc, p_noise=0.5, noise_ids=digits, seed=3)
    assert aug == augment(encoded, bkspc, p_noise=0.5, noise_ids=digits, seed=3)
    n_noise = sum(sum(a.is_noise) for a in aug)
    assert 0 < n_noise < sum(len(a.target_ids) for a in aug)
    for a in aug:
        assert collapse(a.action_ids, bkspc) == a.target_ids
        assert len(a.is_noise) == len(a.action_ids)
        assert all(a.action_ids[i + 1] == bkspc for i, noisy in enumerate(a.is_noise) if noisy)
    rows = make_data_rows(aug, bkspc, id_prefix="arith")
    batch = rows_to_batch(rows)
    validate_batch(batch)
    assert batch.column("sample_id").to_pylist()[:2] == ["arith-0", "arith-1"]
    assert {r["source"] for r in rows} == {"data"} and {r["policy_version"] for r in rows} == {-1}
    assert all(r["final_ids"] == a.target_ids for r, a in zip(rows, aug))
    assert len({r["sample_id"] for r in make_data_rows(aug, bkspc)}) == len(aug)  # uuids


def test_make_data_rows_rejects_a_trace_that_does_not_collapse_to_its_target():
    from sm_dist.data.datasets import AugmentedExample

    bad = AugmentedExample(prompt_ids=[1], target_ids=[5, 2], action_ids=[5, 9], is_noise=[False, False])
    with pytest.raises(ValueError, match=r"collapse to \[5, 9\], not the target \[5, 2\]"):
        make_data_rows([bad], bkspc_id=4)


def test_data_format_and_text_field_from_the_config(tmp_path):
    """data.format (its kind, text_field, prompt_chars) reaches the loader; the config takes the registry's
    format names (tests/unit/test_config_registries.py checks they are exactly FORMATS' and auto)."""
    import json

    from sm_dist.config import ConfigError, DataConfig, load_config
    from sm_dist.data.datasets import FORMATS
    from sm_dist.data.prepare import load_train_data

    for name in ("auto", *FORMATS):
        assert DataConfig(format={"kind": name}).format.kind == name
    with pytest.raises((ConfigError, ValueError), match=r"'xml' is not one of \['auto', 'jsonl'"):
        DataConfig(format={"kind": "xml"})
    f = tmp_path / "stories.data"  # a suffix no format claims: data.format must say it
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Once upon a time", "The end")))
    over = [
        f"run.run_dir={tmp_path / 'r'}",
        f"data.train_path={f}",
        "data.format.text_field=text",
        "data.format.prompt_chars=4",
    ]
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"
    cfg = load_config(tiny, ["data.format.kind=jsonl", *over])  # the kind first: it replaces the whole format
    examples = load_train_data(cfg).examples
    assert [(e.prompt, e.answer) for e in examples] == [("Once", " upon a time"), ("The ", "end")]
    with pytest.raises(ValueError, match=r"data.format"):
        load_train_data(load_config(tiny, over))


def test_literal_bkspc_text_and_non_utf8_lines_are_bad_rows_of_their_own(tmp_path):
    path = tmp_path / "odd.jsonl"
    lines = [
        json.dumps(GOOD).encode(),  # 1
        json.dumps({"prompt": "What is 1 + 1? <bkspc>", "answer": "2"}).encode(),  # 2 bkspc in the prompt
        json.dumps({"prompt": "What is 1 + 1?", "answer": "2<bkspc>3"}).encode(),  # 3 bkspc in the answer
        b'{"prompt": "caf\xe9", "answer": "1"}',  # 4 latin-1, not UTF-8
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    examples, report = load_examples(path, on_bad="skip")
    assert examples == [Example(GOOD["prompt"], GOOD["answer"])]
    assert report.skipped == Counter(bkspc_text=2, not_utf8=1)
    assert report.first_lines == {"bkspc_text": [2, 3], "not_utf8": [4]}
    with pytest.raises(ValueError, match=r"odd\.jsonl:2: bkspc_text: .*data\.on_bad=skip"):
        load_examples(path)
    text = tmp_path / "odd.txt"  # the same rule in plain-text mode
    text.write_text("ab<bkspc>cd\nabcd\n")
    examples, report = load_examples(text, on_bad="skip", prompt_chars=2)
    assert examples == [Example("ab", "cd")] and report.skipped == Counter(bkspc_text=1)


def test_train_data_is_read_and_encoded_once_from_preflight_to_build_data(tmp_path, monkeypatch):
    """preflight reads and encodes data.train_path (its checks need the encoded rows) and hands the
    result on: the driver's build_data makes the same rows from it without reading the file again."""
    from transformers import AutoTokenizer

    from sm_dist.config import load_config
    from sm_dist.data import datasets
    from sm_dist.data.prepare import build_data
    from sm_dist.orchestrator.validate import check_train_data, preflight

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(
        root / "configs" / "tiny-cpu.yaml", [f"run.run_dir={tmp_path / 'run'}", "data.limit=40"]
    )
    calls = {"load": 0, "encode": 0}

    def counting(key: str, real):
        def counted(*a, **k):
            calls[key] += 1
            return real(*a, **k)

        return counted

    monkeypatch.setattr(datasets, "load_examples", counting("load", datasets.load_examples))
    monkeypatch.setattr(datasets, "encode_examples", counting("encode", datasets.encode_examples))
    last, data = preflight(cfg, None)
    assert last is None and len(data.encoded) == 40 and calls == {"load": 1, "encode": 1}
    tok = AutoTokenizer.from_pretrained(cfg.model.start_from)
    once = build_data(cfg, tok, data)
    assert calls == {"load": 1, "encode": 1}
    assert once == build_data(cfg, tok)  # the same rows as a fresh read
    stand_in = check_train_data(cfg, tok, runs_tok=False)  # a tiny model's tokenizer is not known yet
    assert stand_in.encoded is None and len(stand_in.examples) == 40
