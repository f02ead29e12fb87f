"""`sm-dist eval`: exact match of a model, run or checkpoint on prompt/answer data (sm_dist/eval/)."""

from __future__ import annotations

import sys

from sm_dist.errors import UserError

# the flags `_eval` passes on to `sm_dist.eval.arith_eval.evaluate` as they are
EVALUATE_KEYS = ("decoding", "temperature", "top_p", "samples", "seed", "force_error", "limit", "prompt_field",
                 "answer_field", "on_bad", "max_actions", "max_backspaces", "bkspc_bias", "batch_size")  # fmt: skip


def _check_eval_flags(args) -> dict:
    """The flags alone (a wrong combination is wrong whatever the files hold); returns rollout.*'s
    defaults of the caps, {"max_actions": ..., "max_backspaces": ...}."""
    from sm_dist.config import RolloutConfig
    from sm_dist.eval.decoding import decoding_params, resolve_decoding

    if args.limit is not None and args.limit < 1:
        raise UserError(
            f"--limit {args.limit}", "evaluates no example.", "pass --limit N with N >= 1, or omit it"
        )
    caps = RolloutConfig().model_dump(include={"max_actions", "max_backspaces"})  # rollout.*'s defaults
    try:
        dec = resolve_decoding(args.decoding)  # a None cap: decoding_params takes rollout.*'s default
        decoding_params(dec, args.temperature, args.top_p, args.samples, args.seed, args.max_actions,
                        args.max_backspaces, args.bkspc_bias)  # fmt: skip
    except ValueError as e:
        raise UserError("sm-dist eval flags", f"{e}.", "see sm-dist eval --help") from None
    return caps


def _check_eval_data(args) -> None:
    """Every row of --data readable, and at least one usable (before the model and vLLM load)."""
    from sm_dist.eval.arith_eval import load_eval_data

    load_eval_data(args.data, args.prompt_field, args.answer_field, args.on_bad, args.limit)


def _eval(args) -> int:
    import json

    from sm_dist.eval.arith_eval import evaluate, format_table
    from sm_dist.eval.quiet import log_path, to_log_file
    from sm_dist.eval.target import engine_max_len, resolve_target
    from sm_dist.orchestrator.validate import check_model_dir

    caps = _check_eval_flags(args)
    target = resolve_target(args.model)  # a model, a checkpoint or a run (sm_dist/eval/target.py)
    for k, v in {**caps, **target.defaults}.items():
        if getattr(args, k) is None:  # a flag wins; then the run's config.yaml; then rollout.*'s default
            setattr(args, k, v)
    _check_eval_data(args)
    check_model_dir(target.model_dir, "--model")
    max_model_len = engine_max_len(target.model_dir, args.max_model_len)
    log = log_path(args.log_file, args.out)
    for note in target.notes:
        print(f"sm-dist eval: {note}", file=sys.stderr)
    print(f"sm-dist eval: vLLM's output goes to {log}", file=sys.stderr)
    from sm_dist.orchestrator.cluster import set_process_env

    set_process_env()  # vLLM's CPU defaults, before vLLM is imported
    with to_log_file(log):  # file descriptors 1 and 2: vLLM prints from C++ and subprocesses too
        summary = evaluate(target.model_dir, args.data, progress=False, max_model_len=max_model_len,
                           **{k: getattr(args, k) for k in EVALUATE_KEYS})  # fmt: skip
    summary["model_arg"] = str(args.model)
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(f"sm-dist eval: results written to {args.out}", file=sys.stderr)
    return 0


def add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluation (exact match) of a model, run or checkpoint on prompt/answer data",
        description="Backspace-aware generation with vLLM on every prompt, exact match against the "
        "answer. Decodings: search (default; temperature 0, a token deleted at a state is never "
        "chosen again there), greedy (temperature 0; loops after a <bkspc>, for comparison), "
        "greedy_no_bkspc (temperature 0, <bkspc> forbidden: the control), sample (--temperature, "
        "--top-p, --samples K per question, --seed). Stdout: a markdown table of the metrics (accuracy "
        "over all samples, pass_at_k, malformed_rate, bkspc_cap_hits and length_cap_hits, backspace "
        "statistics, per-base accuracy), or the JSON with --json; vLLM's output goes to --log-file.",
    )
    _add_eval_io_args(ev)
    _add_eval_decoding_args(ev)
    ev.set_defaults(func=_eval)


def _add_eval_io_args(ev) -> None:
    """What is evaluated, on what, and where the results and the engine's output go."""
    ev.add_argument(
        "--model",
        required=True,
        help="an HF model folder with <bkspc>; a run directory RUN (its newest intact checkpoint's "
        "weights); or a checkpoint RUN/checkpoints/step-N (its weights, step-N/model). With a run or a "
        "checkpoint, --max-actions and --max-backspaces default to the run's config.yaml. RUN/model is "
        "the run's start model (before training), not the trained one",
    )
    ev.add_argument("--data", required=True, help="jsonl or parquet with prompt/answer fields")
    ev.add_argument("--out", help="write the results (metrics + per-example) as JSON here")
    ev.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout instead of the table"
    )
    ev.add_argument(
        "--log-file",
        help="vLLM's and the engine's output (default: beside --out as .log, else a temporary file; "
        "its path is said on stderr)",
    )
    ev.add_argument(
        "--max-model-len",
        type=int,
        help="the engine's context in tokens (default: the model's max_position_embeddings, at most 2048)",
    )


def _add_eval_decoding_args(ev) -> None:
    """How each answer is decoded, the recovery measure, the data's fields and the caps (in --help
    order)."""
    ev.add_argument(
        "--decoding",
        choices=("search", "greedy", "greedy_no_bkspc", "sample"),
        default=None,
        help="decoding mode (default search)",
    )
    ev.add_argument("--temperature", type=float, help="sample only (default 1.0)")
    ev.add_argument("--top-p", type=float, default=1.0, help="sample only (default 1.0)")
    ev.add_argument(
        "--samples", type=int, default=1, help="samples per question, K of pass_at_k (sample only if > 1)"
    )
    ev.add_argument("--seed", type=int, default=0, help="sampling and --force-error seed (default 0)")
    ev.add_argument(
        "--force-error",
        action="store_true",
        help="recovery measure: start each answer with a correct prefix then one wrong answer token",
    )
    ev.add_argument("--limit", type=int, help="evaluate only the first N examples")
    ev.add_argument("--prompt-field", default="prompt")
    ev.add_argument("--answer-field", default="answer")
    ev.add_argument("--on-bad", choices=("error", "skip"), default="error", help="bad data rows")
    ev.add_argument(
        "--max-actions",
        type=int,
        help="cap on actions per answer (default: the run's rollout.max_actions, else rollout's default 32)",
    )
    ev.add_argument(
        "--max-backspaces",
        type=int,
        help="cap on <bkspc> per answer (default: the run's rollout.max_backspaces, else rollout's default 8)",
    )
    ev.add_argument(
        "--bkspc-bias",
        type=float,
        default=0.0,
        help="added to the <bkspc> logit wherever it is allowed (negative: backspace less often; default 0)",
    )
    ev.add_argument("--batch-size", type=int, default=256, help="prompts per generation batch")
