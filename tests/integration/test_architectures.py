"""End to end on other architectures than the tiny Llama, with FSDP2 on 2 gloo learner ranks and the gloo
weight transport: a tiny Qwen2 with a chat template (LoRA, trained on a `datasets` save_to_disk folder of
`messages` rows) and a tiny GPT-2 (no BOS, tied head; full finetune on prompt/answer jsonl), each built
from a transformers config with a locally trained tokenizer and given `<bkspc>` by `sm-dist add-bkspc`.

Two `sm-dist train` runs in all (module fixtures, each run once and shared by the tests that read it):
run A (Qwen2 + LoRA + chat rows) and run B (GPT-2, whole model). The remaining combinations (Qwen2
without LoRA, GPT-2 with LoRA) are covered at the learner level, 2 FSDP2 ranks against 1, in
tests/integration/test_lora_ranks.py; the tiny Llama with and without LoRA in test_lora_ranks.py,
test_learner.py and test_pipeline.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from tests.integration.test_pipeline import ROOT, _env, _metrics, train_cmd

pytestmark = pytest.mark.slow

# Qwen2's tokenizer gets a chat template that starts with BOS (as Llama-2's does), so "BOS included" is
# a property of the rendered prompt the run must keep
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SYSTEM = "answer in the same base"
STEPS = 8
FSDP2_GLOO = [
    "learner.strategy=fsdp2",
    "learner.num_learners=2",
    "learner.cpus_per_learner=0.5",
    "sync.transport.kind=gloo",
    f"run.total_steps={STEPS}",
    "objective.warmup_steps=4",
    "sync.every=4",
    "run.eval_path=null",
    "run.progress=false",
    "model.start_from=null",
    "data.max_prompt_len=64",
    "data.max_answer_len=24",  # a base-2 answer is up to 17 of the Qwen2 tokenizer's tokens, eos included
]


def _chat(row: dict, i: int) -> list[dict]:
    turns = [{"role": "system", "content": SYSTEM}] if i % 2 else []  # every other row has a system turn
    return [
        *turns,
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["answer"]},
    ]


def _template_ids(tok, turns) -> list[int]:
    ids = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The two start models (with `<bkspc>`, by the real CLI), the chat dataset folder and the jsonl."""
    from datasets import Dataset

    from sm_dist.core.tiny import train_tokenizer
    from sm_dist.data.arith import generate
    from tests.archs import build_model, gpt2_style_tokenizer

    tmp = tmp_path_factory.mktemp("archs-e2e")
    rows = generate(200, "easy", seed=11)
    texts = [f"{r['prompt']} {r['answer']}" for r in rows]
    qtok = train_tokenizer(
        [*texts, *[f"<|system|>\n{SYSTEM}\n<|user|>\n<|assistant|>\n"] * 50], 400, with_bkspc=False
    )
    qtok.chat_template = TEMPLATE
    bases = {
        "qwen2": build_model("qwen2", qtok, tmp / "qwen2"),
        "gpt2": build_model("gpt2", gpt2_style_tokenizer(texts), tmp / "gpt2"),
    }
    procs = {
        a: subprocess.Popen(
            [sys.executable, "-m", "sm_dist", "add-bkspc", str(d), str(tmp / f"{a}-bkspc")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        for a, d in bases.items()
    }  # fmt: skip
    for a, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"add-bkspc {a}: {err[-2000:]}"
        assert out.startswith("<bkspc> has id "), out
    chats = [{"messages": _chat(r, i)} for i, r in enumerate(rows)]
    Dataset.from_list(chats).save_to_disk(str(tmp / "chat-ds"))
    (tmp / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "tmp": tmp,
        "qwen2": tmp / "qwen2-bkspc",
        "gpt2": tmp / "gpt2-bkspc",
        "chats": chats,
        "rows": rows,
    }


def _train(tmp, name: str, *overrides: str) -> dict:
    ray_tmp = tempfile.mkdtemp(prefix="smr-", dir="/tmp")
    run = tmp / name
    try:
        out = subprocess.run(
            train_cmd(run, *FSDP2_GLOO, *overrides), env=_env(tmp, ray_tmp), capture_output=True, text=True,
            timeout=600, cwd=ROOT,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return {"run": run, "out": out, "summary": json.loads((run / "summary.json").read_text())}


@pytest.fixture(scope="module")
def qwen2_lora_run(built):
    """Run A: Qwen2 + LoRA r=8, FSDP2 x 2 gloo ranks, chat rows from a save_to_disk folder."""
    return _train(
        built["tmp"], "run-qwen2-lora", f"model.dir={built['qwen2']}", f"data.train_path={built['tmp'] / 'chat-ds'}",
        "model.lora.r=8",
    )  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_run(built):
    """Run B: GPT-2, whole model, FSDP2 x 2 gloo ranks, prompt/answer jsonl."""
    return _train(
        built["tmp"],
        "run-gpt2",
        f"model.dir={built['gpt2']}",
        f"data.train_path={built['tmp'] / 'plain.jsonl'}",
    )


def _trains_and_syncs(r: dict) -> None:
    from sm_dist.buffer import read_run_buffer

    run = r["run"]
    m = _metrics(run)
    assert [x["step"] for x in m] == list(range(1, STEPS + 1))
    assert any(x["learner/replay_rows"] > 0 for x in m)  # SequenceMatch steps on the workers' rollouts
    synced = r["summary"]["syncs_applied"]  # versions 1 and 2 (steps 4 and 8), applied by both workers
    assert set(synced) == {"w0", "w1"} and min(synced.values()) >= 2, synced
    assert read_run_buffer(run).num_rows > 0  # the vLLM workers' rollouts reached the replay buffer
    assert (run / "checkpoints" / f"step-{STEPS:08d}" / "learner_state.json").is_file()


def test_tokenizers_are_as_built(built):
    """Qwen2's tokenizer kept its chat template through add-bkspc; GPT-2's adds no BOS (bos = eos)."""
    from transformers import AutoTokenizer

    from sm_dist.core.vocab import get_bkspc_id

    q, g = (AutoTokenizer.from_pretrained(built[a]) for a in ("qwen2", "gpt2"))
    assert q.chat_template == TEMPLATE and q.bos_token == "<bos>"
    assert g.bos_token_id == g.eos_token_id and g.encode("In base 7, what is 1 + 2?")[0] != g.bos_token_id
    for tok, arch in ((q, "qwen2"), (g, "gpt2")):
        assert get_bkspc_id(tok) == len(tok) - 1, arch


def test_qwen2_lora_chat_run_trains_and_syncs(qwen2_lora_run):
    _trains_and_syncs(qwen2_lora_run)


def test_qwen2_lora_changes_only_adapters_and_the_bkspc_row(qwen2_lora_run, built, tmp_path):
    """The checkpoint holds the adapter alone (LoRA A/B and the `<bkspc>` row deltas); merged (`sm-dist
    export`'s PEFT merge) against the start model: the LoRA targets changed, the embedding did not (the
    `<bkspc>` embedding row gets no gradient: it is never an input), the head only in the `<bkspc>` row,
    norms and Qwen2's q/k/v biases not at all."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.learner.export import export

    ck = qwen2_lora_run["run"] / "checkpoints" / f"step-{STEPS:08d}" / "model"
    adapter = load_file(str(ck / "adapter_model.safetensors"))
    assert adapter and all(("lora_" in k) or ("trainable_tokens_delta" in k) for k in adapter), sorted(
        adapter
    )
    assert not any(p.name.startswith("model") for p in ck.glob("*.safetensors"))
    export(qwen2_lora_run["run"], tmp_path / "merged")
    merged, base = (
        load_file(str(tmp_path / "merged" / "model.safetensors")),
        load_file(str(built["qwen2"] / "model.safetensors")),
    )
    assert set(merged) == set(base)
    bk = get_bkspc_id(AutoTokenizer.from_pretrained(built["qwen2"]))
    rows = {
        n: (merged[n] != base[n]).any(dim=1).nonzero().flatten().tolist()
        for n in ("model.embed_tokens.weight", "lm_head.weight")
    }
    assert rows == {"model.embed_tokens.weight": [], "lm_head.weight": [bk]}, rows
    for name, w in base.items():
        if name.endswith("_proj.weight"):
            assert not torch.equal(merged[name], w), f"{name}: a LoRA target did not change"
        elif name not in rows:
            assert torch.equal(merged[name], w), f"{name} changed (frozen, not a LoRA target)"


def test_chat_prompts_are_the_templates_ids_bos_included(qwen2_lora_run, built):
    """The prompt ids the run stored for its expert rows (what the learners trained on) are
    `tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)`'s ids, BOS first and once;
    every rollout the vLLM workers wrote starts from one of those prompts."""
    from transformers import AutoTokenizer

    from sm_dist.buffer import read_run_buffer

    tok = AutoTokenizer.from_pretrained(built["qwen2"])
    want = [_template_ids(tok, c["messages"][:-1]) for c in built["chats"]]
    expert = read_run_buffer(qwen2_lora_run["run"] / "expert").to_pylist()
    seen = 0
    for row in expert:
        copy, _, i = row["sample_id"].partition("-")
        assert copy.startswith("data"), row["sample_id"]
        assert row["prompt_ids"] == want[int(i)], (row["sample_id"], row["prompt_ids"], want[int(i)])
        seen += 1
    assert seen >= len(want), (seen, len(want))
    assert all(w[0] == tok.bos_token_id and w.count(tok.bos_token_id) == 1 for w in want)
    assert tok.decode(want[1]).startswith(f"<bos><|system|>\n{SYSTEM}\n<|user|>\n")
    prompts = {tuple(w) for w in want}
    rollouts = read_run_buffer(qwen2_lora_run["run"]).to_pylist()
    assert rollouts and all(tuple(r["prompt_ids"]) in prompts for r in rollouts)


def test_gpt2_run_trains_and_syncs(gpt2_run, built):
    """GPT-2 (GPT2Block layers sharded, head tied to the embedding, Conv1D weights) trains the whole
    model and syncs; its prompts carry no BOS (the tokenizer adds none)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sm_dist.buffer import read_run_buffer

    _trains_and_syncs(gpt2_run)
    tok = AutoTokenizer.from_pretrained(built["gpt2"])
    by_prompt = {r["prompt"]: tok.encode(r["prompt"], add_special_tokens=False) for r in built["rows"]}
    expert = read_run_buffer(gpt2_run["run"] / "expert").to_pylist()
    got = {tuple(r["prompt_ids"]) for r in expert}
    assert got and got <= {tuple(v) for v in by_prompt.values()}
    assert all(r["prompt_ids"][0] != tok.bos_token_id for r in expert)
    ck = gpt2_run["run"] / "checkpoints" / f"step-{STEPS:08d}" / "model"
    trained, base = (
        load_file(str(ck / "model.safetensors")),
        load_file(str(built["gpt2"] / "model.safetensors")),
    )
    # the gathered FSDP2 state dict holds the tied head as its own key (a copy; the start model saved it
    # once): the tie held through the sharded steps, so it equals the embedding
    assert set(trained) - set(base) <= {"lm_head.weight"} and set(base) <= set(trained)
    assert torch.equal(
        trained.get("lm_head.weight", trained["transformer.wte.weight"]), trained["transformer.wte.weight"]
    )
    assert all(not torch.equal(trained[k], base[k]) for k in base if k.endswith("attn.c_attn.weight")), (
        "no step"
    )
