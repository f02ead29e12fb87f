"""`model.lora` / `model.load_in_4bit` in the typed config: the shipped QLoRA config validates, what
cannot run is refused in one line naming the fix, and QLoRA's quantisation settings are the paper's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sm_dist.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
QLORA = ROOT / "configs" / "llama2-7b-qlora.yaml"


def test_shipped_qlora_config_is_the_papers_setting(tiny_model_dir):
    cfg = Config.model_validate(yaml.safe_load(QLORA.read_text()))  # model.dir exists only on the cluster
    assert cfg.model.load_in_4bit and (cfg.model.lora.r, cfg.model.lora.alpha) == (64, 16)
    gpus = (
        cfg.learner.num_learners * cfg.learner.gpus_per_learner
        + cfg.rollout.num_workers * cfg.rollout.gpus_per_worker
    )
    assert gpus == 4
    # `sm-dist config` validates it whole once model.dir and the data exist (here: a tiny model)
    data = ROOT / "configs" / "data" / "arith" / "add_or_sub_in_base.train-easy.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "config", str(QLORA), f"model.dir={tiny_model_dir}", f"data.train_path={data}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "load_in_4bit: true" in out.stdout and "r: 64" in out.stdout


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["learner.gpus_per_learner=0"], "model.load_in_4bit", "need CUDA"),
        (["model.lora.r=0"], "model.load_in_4bit", "model.lora.r"),
    ],
)
def test_qlora_refusals_name_the_fix(tmp_path, overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(QLORA, overrides)
    assert e.value.key == key and words in str(e.value) and "Fix:" in str(e.value)


def test_cli_refuses_qlora_without_cuda_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "config", "configs/tiny-cpu.yaml", "model.lora.r=8", "model.load_in_4bit=true"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and line.startswith("sm-dist config: config error at `model.load_in_4bit`")
    assert "Fix: give the learners GPUs" in line


def test_lora_with_nccl_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(
            ROOT / "configs" / "tiny-cpu.yaml",
            [
                "model.lora.r=8",
                "sync.transport.kind=nccl",
                "learner.gpus_per_learner=1",
                "rollout.gpus_per_worker=1",
            ],
        )
    assert e.value.key == "sync.transport" and "object_store" in str(e.value)


def test_one_override_turns_lora_on():
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", ["model.lora.r=8"])
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == "all-linear"


def test_learner_refuses_4bit_on_cpu(tiny_model_dir):
    """Past the config (a GPU learner asked for), a rank that finds no CUDA says so before loading."""
    from sm_dist.config import LearnerConfig, LoraSettings, ModelConfig, ObjectiveConfig
    from sm_dist.errors import UserError
    from sm_dist.learner.learner import Learner

    m = ModelConfig(load_in_4bit=True, lora=LoraSettings(r=8))
    with pytest.raises(UserError, match=r"model.load_in_4bit.*needs CUDA.*Fix: run the learners on GPUs"):
        Learner(0, 1, str(tiny_model_dir), LearnerConfig(), ObjectiveConfig(), 10, device="cpu", model=m)


def test_quantization_config_is_nf4_double_quant():
    """Written against transformers' BitsAndBytesConfig (bitsandbytes itself needs CUDA: not run here)."""
    import torch

    from sm_dist.learner.lora import compute_dtype, quantization_config

    q = quantization_config(compute_dtype("float32"))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(compute_dtype("float16")).bnb_4bit_compute_dtype == torch.float16
