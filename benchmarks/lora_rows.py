"""How the `<bkspc>` rows train under LoRA (model.lora.bkspc_rows): PEFT's `trainable_token_indices`
(the one row of the embedding and of the LM head) against `modules_to_save` (whole copies of both).

Printed per variant: trainable parameters, their AdamW moments in bytes (2 x float32 each), for the tiny
model of configs/tiny-cpu.yaml (r=8) and for the paper's 7B Llama-2 shape (r=64, built on the meta
device: no weights are read), and the median seconds of a tiny learner step (CPU). Last line:
`modules_to_save_over_trainable_tokens_7b_params: X`.

    python benchmarks/lora_rows.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def counts_7b(rows: str) -> tuple[int, int]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sm_dist.config import LoraSettings
    from sm_dist.learner import lora

    cfg = LlamaConfig(
        vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    )  # fmt: skip  # Llama-2-7B + <bkspc>
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return lora.param_counts(lora.apply_lora(model, LoraSettings(r=64, alpha=16, bkspc_rows=rows), 32000))


def tiny_step(model_dir: str, rows: str, repeats: int) -> tuple[int, float]:
    from sm_dist.config import LearnerConfig, LoraSettings, ModelConfig, ObjectiveConfig
    from sm_dist.data.arith import generate
    from sm_dist.data.datasets import Example, augment, encode_examples, make_data_rows
    from sm_dist.learner import lora
    from sm_dist.learner.learner import Learner

    m = ModelConfig(lora=LoraSettings(r=8, bkspc_rows=rows))
    lr = Learner(0, 1, model_dir, LearnerConfig(lr_warmup_steps=0), ObjectiveConfig(warmup_steps=0), 100,
                 device="cpu", model=m)  # fmt: skip
    ex = [Example(e["prompt"], e["answer"]) for e in generate(32, "easy", seed=1)]
    enc, _ = encode_examples(ex, lr.tokenizer, 64, 32, "skip")
    digits = lr.tokenizer.convert_tokens_to_ids(list("0123456789"))
    data = make_data_rows(augment(enc, lr.bkspc_id, 0.2, digits, seed=0), lr.bkspc_id, id_prefix="d")
    secs = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        lr.train_step(data)
        if i:  # step 0 is a warm-up
            secs.append(time.perf_counter() - t0)
    return lora.param_counts(lr.module)[0], statistics.median(secs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from sm_dist.core.tiny import make_tiny_model

    model_dir = str(make_tiny_model(tempfile.mkdtemp(prefix="smdist-rows-") + "/model"))
    big = {}
    for rows in ("trainable_tokens", "modules_to_save"):
        n, step_s = tiny_step(model_dir, rows, args.repeats)
        big[rows], total = counts_7b(rows)
        print(f"tiny r=8 {rows}: {n} trainable, AdamW moments {8 * n} bytes, step {step_s:.4f}s", flush=True)
        print(
            f"7b r=64 {rows}: {big[rows]} trainable of {total}, AdamW moments {8 * big[rows] / 2**30:.2f} GiB"
        )
    ratio = big["modules_to_save"] / big["trainable_tokens"]
    print(f"modules_to_save_over_trainable_tokens_7b_params: {ratio:.3f}")


if __name__ == "__main__":
    main()
