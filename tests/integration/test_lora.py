"""LoRA learner (PEFT, no Ray): only the adapters and the `<bkspc>` rows train; the merged weights the
learner syncs equal PEFT's own merge; a checkpoint holds the adapter and the rows alone, resumes exactly,
and `sm-dist export` writes the merged HF folder; weights leave the learner in model.dtype."""

from __future__ import annotations

import json

import pytest
import torch

from sm_dist.config import LearnerConfig, LoraSettings, ModelConfig, ObjectiveConfig

LEARNER = LearnerConfig(lr=1e-2, lr_warmup_steps=0, schedule="constant", clip_norm=1.0)
OBJECTIVE = ObjectiveConfig(
    divergence={"kind": "chi2_mixture", "chi2_weight": 1e-3}, warmup_steps=0, sm_lambda=0.5
)
LORA = ModelConfig(lora=LoraSettings(r=8, alpha=16))


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    from transformers import AutoTokenizer

    from sm_dist.core.vocab import get_bkspc_id
    from sm_dist.data.arith import generate
    from sm_dist.data.datasets import Example, augment, encode_examples, make_data_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bk = get_bkspc_id(tok)
    ex = [Example(e["prompt"], e["answer"]) for e in generate(8, "easy", seed=5)]
    enc, _ = encode_examples(ex, tok, 64, 32, "skip")
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    return make_data_rows(augment(enc, bk, 0.3, digits, seed=0), bk, id_prefix="d")


def _learner(model_dir, model_cfg=LORA, **kw):
    from sm_dist.learner.learner import Learner

    return Learner(0, 1, str(model_dir), LEARNER, OBJECTIVE, 10, seed=0, device="cpu", model=model_cfg, **kw)


def _base_sd(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, rows, tmp_path_factory):
    """A LoRA learner after 3 steps, its checkpoint, and the merged weights it publishes."""
    lr = _learner(tiny_model_dir)
    for _ in range(3):
        lr.train_step(rows)
    ck = tmp_path_factory.mktemp("lora-ckpt")
    lr.save(str(ck))
    return lr, ck, {k: v.clone() for k, v in lr._sync_state_dict().items()}


def test_only_adapters_and_bkspc_rows_change(trained, tiny_model_dir):
    lr, _, merged = trained
    trainable = {n for n, p in lr.module.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("trainable_tokens_delta" in n) for n in trainable)
    base = _base_sd(tiny_model_dir)
    assert set(merged) == set(base)
    b = lr.bkspc_id
    changed = {
        name: (merged[name] != base[name]).any(dim=1).nonzero().flatten().tolist()
        for name in ("model.embed_tokens.weight", "lm_head.weight")
    }
    # the <bkspc> head row alone; its embedding row trains too but gets no gradient: <bkspc> is never an
    # input of the single-pass layout (DESIGN §2), so it stays as it was (a tied model shares the head's)
    assert changed == {"model.embed_tokens.weight": [], "lm_head.weight": [b]}, changed
    for name, w in base.items():  # LoRA targets change; norms and the rest stay as they were
        if name.endswith("norm.weight"):
            assert torch.equal(merged[name], w), name
        elif "_proj." in name:
            assert not torch.equal(merged[name], w), name


def test_merged_weights_equal_peft_merge(trained):
    import copy

    lr, _, merged = trained
    ref = copy.deepcopy(lr.module).merge_and_unload().state_dict()
    assert set(ref) == set(merged)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)


def test_checkpoint_holds_adapter_only_and_resumes(trained, tiny_model_dir, rows):
    from safetensors import safe_open

    from sm_dist.learner import sharded

    lr, ck, merged = trained
    files = sorted(p.name for p in (ck / "model").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    cfg = json.loads((ck / "model" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir) and cfg["r"] == 8
    with safe_open(str(ck / "model" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(("lora_" in k) or ("trainable_tokens_delta" in k) for k in keys)
    state = sharded.read_all(ck / "state")["model"]
    assert set(state) == {n for n, p in lr.module.named_parameters() if p.requires_grad}
    # resume: a fresh learner on the adapter folder (what a learner restart gets) takes the same next step
    again = _learner(ck / "model")
    assert again.model_dir == str(tiny_model_dir)
    assert again.load(str(ck)) == 3
    for k, v in again._sync_state_dict().items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=0)
    lr2 = _learner(tiny_model_dir)
    lr2.load(str(ck))
    lr2.train_step(rows)
    again.train_step(rows)
    a, b = again._sync_state_dict(), lr2._sync_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_export_writes_merged_hf_folder(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from sm_dist.learner.export import export

    _, ck, merged = trained
    export(ck, tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_weights_leave_the_learner_in_model_dtype(tiny_model_dir, tmp_path):
    """bf16 engines get bf16 (LoRA: merged in bf16; full model: cast by the sender's one copy), and the
    checkpoint's HF folder is bf16, while the learner's master weights stay float32."""
    from safetensors import safe_open

    from sm_dist.sync.object_store import safetensors_views, state_dict_to_buffer

    for lora_r in (8, 0):
        lr = _learner(tiny_model_dir, ModelConfig(dtype="bfloat16", lora=LoraSettings(r=lora_r)))
        assert all(p.dtype == torch.float32 for p in lr.module.parameters())
        sent = safetensors_views(state_dict_to_buffer(lr._sync_state_dict(), lr.weights_dtype))
        assert {t.dtype for t in sent.values()} == {torch.bfloat16}, lora_r
        if lora_r == 0:
            lr.save(str(tmp_path))
            with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
                assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_trainable_counts_trainable_tokens_vs_modules_to_save(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sm_dist.learner import lora

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    hidden, vocab = m.config.hidden_size, m.config.vocab_size
    tt = lora.param_counts(lora.apply_lora(m, LoraSettings(r=8), 1))[0]
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ms = lora.param_counts(lora.apply_lora(m, LoraSettings(r=8, bkspc_rows="modules_to_save"), 1))[0]
    assert ms - tt == 2 * vocab * hidden - 2 * hidden  # whole matrices against one row of each
