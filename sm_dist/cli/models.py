"""`sm-dist make-tiny-model`, `add-bkspc` and `export`: model folders in and out."""

from __future__ import annotations

from pathlib import Path

from sm_dist.errors import DataError, ModelError, UserError


def _make_tiny_model(args) -> int:
    from sm_dist.config import VLLM_CPU_HEAD_SIZES

    head, rem = divmod(args.hidden_size, args.num_heads) if args.num_heads > 0 else (0, 1)
    if rem or head not in VLLM_CPU_HEAD_SIZES:
        raise UserError(
            f"--hidden-size {args.hidden_size} --num-heads {args.num_heads}",
            f"head size {args.hidden_size}/{args.num_heads} is not one vLLM's CPU attention supports "
            f"{VLLM_CPU_HEAD_SIZES}.",
            "e.g. --hidden-size 128 --num-heads 2",
        )
    texts = None
    if args.text:
        try:
            with open(args.text, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
            raise DataError(
                f"--text {args.text}", f"cannot be read as UTF-8 text ({e}).", "pass a text file"
            ) from None
    from sm_dist.core.tiny import make_tiny_model

    out = make_tiny_model(
        args.out,
        texts=texts,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        seed=args.seed,
    )
    print(f"tiny model written to {out}")
    return 0


def _add_bkspc(args) -> int:
    from sm_dist.hub import resolve_model

    # a hub id: its folder in the huggingface_hub cache
    args.model_dir = resolve_model(args.model_dir, what="MODEL_DIR") or args.model_dir
    if not (Path(args.model_dir) / "config.json").is_file():
        problem = "has no config.json" if Path(args.model_dir).is_dir() else "does not exist"
        raise ModelError(
            args.model_dir, f"{problem}; an HF causal-LM folder was expected.", "pass a model folder"
        )
    from sm_dist.core.vocab import add_bkspc_to_dir

    bid = add_bkspc_to_dir(args.model_dir, args.out)
    print(f"<bkspc> has id {bid}; model + tokenizer written to {args.out}")
    return 0


def _export(args) -> int:
    from sm_dist.learner.export import export

    ckpt = export(args.run_dir, args.out, args.dtype)
    print(f"{ckpt} exported to {args.out} (a plain HF folder, adapters merged)")
    return 0


def add_model_parsers(sub) -> None:
    t = sub.add_parser(
        "make-tiny-model", help="build a tiny Llama + locally trained tokenizer (with <bkspc>)"
    )
    t.add_argument("out", help="output folder (loadable by transformers and vLLM)")
    t.add_argument("--text", help="train a byte-level BPE on this text file; default: arithmetic alphabet")
    t.add_argument("--vocab-size", type=int, default=512, help="BPE vocab size when --text is given")
    t.add_argument("--hidden-size", type=int, default=128)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument(
        "--num-heads", type=int, default=2, help="hidden/heads must be a vLLM CPU head size (32, 64)"
    )
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_make_tiny_model)

    a = sub.add_parser("add-bkspc", help="add <bkspc> to an HF model folder (resizes embeddings and head)")
    a.add_argument("model_dir", help="an HF model folder, or a hub id (from the huggingface_hub cache)")
    a.add_argument("out")
    a.set_defaults(func=_add_bkspc)

    e = sub.add_parser("export", help="a run's newest checkpoint as a plain HF folder (LoRA merged)")
    e.add_argument("run_dir", help="run directory (or one checkpoint folder, checkpoints/step-N)")
    e.add_argument("out", help="output folder")
    e.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: the run's model.dtype"
    )
    e.set_defaults(func=_export)
