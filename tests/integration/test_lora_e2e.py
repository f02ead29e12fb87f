"""End to end with LoRA: `sm-dist train configs/tiny-cpu.yaml model.lora.r=8` trains, syncs merged weights
to both vLLM workers and checkpoints the adapter alone; `--resume` goes on from the checkpoint; `sm-dist
export` writes the merged HF folder; and after a sync from the LoRA learner a worker's log-probs equal the
merged HF model's. One run shared by every test here (a module fixture)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.integration.test_pipeline import NO_HELDOUT, ROOT, _env, _metrics, train_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    import shutil
    import tempfile

    tmp = tmp_path_factory.mktemp("lora-e2e")
    ray_tmp = tempfile.mkdtemp(prefix="smr-", dir="/tmp")
    run, env = tmp / "run", _env(tmp, ray_tmp)

    def sm(*args, timeout=400):
        return subprocess.run(
            [sys.executable, "-m", "sm_dist", *args], env=env, capture_output=True, text=True, timeout=timeout,
            cwd=ROOT,
        )  # fmt: skip

    first = subprocess.run(
        train_cmd(run, "model.lora.r=8", "run.total_steps=12", NO_HELDOUT), env=env, capture_output=True, text=True,
        timeout=400, cwd=ROOT,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    summary1 = json.loads((run / "summary.json").read_text())
    resumed = sm("train", "--resume", str(run), "run.total_steps=16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    exported = sm("export", str(run), str(tmp / "merged"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    yield {"run": run, "tmp": tmp, "summary1": summary1, "resumed": resumed, "exported": exported}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_lora_run_trains_syncs_and_checkpoints_the_adapter(lora_run):
    run = lora_run["run"]
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(1, 17)), steps  # 12 steps, then 4 more after the resume
    assert min(lora_run["summary1"]["syncs_applied"].values()) >= 2, lora_run["summary1"]
    ck = run / "checkpoints" / "step-00000012"
    files = {p.name for p in (ck / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), files
    # the adapter is a small fraction of the base model's bytes
    base_bytes = sum(p.stat().st_size for p in (run / "model").glob("*.safetensors"))
    assert (ck / "model" / "adapter_model.safetensors").stat().st_size < base_bytes / 5


def test_lora_resume_continues_from_the_checkpoint(lora_run):
    run, out = lora_run["run"], lora_run["resumed"]
    assert "resumed from" in out.stderr and "at step 12" in out.stderr
    assert not (run / "resumed-model").exists()  # a LoRA run's actors restart on the base folder
    assert (run / "checkpoints" / "step-00000016" / "model" / "adapter_config.json").is_file()


def test_export_and_worker_logprobs_equal_merged_model(lora_run, ray_cluster):
    """A LoRA learner loaded from the last checkpoint publishes (object store, merged weights) into a
    rollout worker started on the base model; the worker's log-probs of a probe then equal the exported
    merged HF model's (the export uses PEFT's own merge_and_unload) within 1e-4."""
    ray = ray_cluster
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sm_dist.config import load_config
    from sm_dist.learner.learner import Learner
    from sm_dist.rollout.engine import RolloutParams
    from sm_dist.rollout.worker import RolloutWorker, probe_logprobs
    from sm_dist.sync.base import confirm_version, wait_all

    run, tmp = lora_run["run"], lora_run["tmp"]
    cfg = load_config(run / "config.yaml")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp / "merged"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp / "merged"))
    prompt = tok.encode("In base 7, what is 25 + -3?", add_special_tokens=False)
    actions = tok.encode("12", add_special_tokens=False) + [tok.eos_token_id]
    with torch.no_grad():
        logp = merged(torch.tensor([prompt + actions])).logits[0].log_softmax(-1)
    ref = [float(logp[len(prompt) + i - 1, a]) for i, a in enumerate(actions)]

    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(
        "w-lora", str(run / "model"), [prompt], RolloutParams(max_actions=8, seed=1), batch_size=1
    )
    last = run / "checkpoints" / "step-00000016"
    lr = Learner(0, 1, str(last / "model"), cfg.learner, cfg.objective, 16, device="cpu", model=cfg.model)
    lr.load(str(last))
    d = lr.publish_weights(7, workers=[worker], names=["w-lora"])
    confirm_version("w-lora", wait_all([d.pending[0]], ["w-lora"], 120, "sync")[0], 7)
    got = ray.get(worker.__ray_call__.remote(probe_logprobs, prompt, actions), timeout=120)
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-4, (got, ref)
    ray.kill(worker)
