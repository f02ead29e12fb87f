"""The `sm-dist` command line (also `python -m sm_dist`).

One error boundary (`main`): a `sm_dist.errors.UserError` (a bad file, folder, value or checkpoint)
ends as one line on stderr, `sm-dist <command>: <input>: <problem> Fix: <fix>`, with exit code 2;
`--debug` or `SM_DIST_DEBUG=1` re-raises it with its traceback. Any other exception is a bug and keeps
its traceback. The commands check their inputs before they start anything slow.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sm_dist.errors import DataError, ModelError, UserError, filesystem_error, one_line


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


def _train(args) -> int:
    from sm_dist.config import load_config, load_resume_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]  # `train --resume DIR key=value`: no CONFIG
    if args.resume:
        cfg = load_resume_config(args.resume, config, overrides)
    elif config is None:
        raise UserError(
            "CONFIG", "sm-dist train needs a config file, or --resume RUN_DIR to continue a run.",
            "sm-dist train configs/tiny-cpu.yaml (or sm-dist train --resume runs/tiny-cpu)",
        )  # fmt: skip
    else:
        cfg = load_config(config, overrides)
    from sm_dist.orchestrator.driver import train

    args.run_dir_used = cfg.run.run_dir

    return train(cfg, resume=args.resume, address=args.address)


def _config(args) -> int:
    from sm_dist.config import dump_config, load_config, reference

    if args.reference:
        print(reference(), end="")
        return 0
    print(dump_config(load_config(args.config, list(args.overrides))), end="")
    return 0


def _status(args) -> int:
    import json

    from sm_dist.service.status import format_status, run_status

    st = run_status(args.run_dir)
    print(json.dumps(st, indent=1, default=str) if args.json else format_status(st))
    return 0


def _ctl(args) -> int:
    import json

    from sm_dist.service.ctl import call
    from sm_dist.service.status import format_status

    if args.command_name == "scale" and (args.n is None or args.n < 1):
        raise UserError(
            "ctl scale", "needs the number of rollout workers.", "e.g. sm-dist ctl RUN_DIR scale 3"
        )
    out = call(args.run_dir, args.command_name, args.n)
    if args.command_name == "status":
        live = out.pop("live", {})
        print(format_status(out))
        print(f"live:        step {live.get('step')}, workers {live.get('workers')} (+{live.get('joining', 0)} "
              f"starting){', paused' if live.get('paused') else ''}")  # fmt: skip
    else:
        print(out if isinstance(out, str) else json.dumps(out, indent=1))
    return 0


def _eval(args) -> int:
    import json

    from sm_dist.config import RolloutConfig
    from sm_dist.eval.arith_eval import evaluate, format_table
    from sm_dist.eval.decoding import decoding_params, resolve_decoding
    from sm_dist.eval.quiet import log_path, to_log_file
    from sm_dist.eval.target import engine_max_len, resolve_target
    from sm_dist.orchestrator.validate import check_model_dir

    if args.limit is not None and args.limit < 1:
        raise UserError(
            f"--limit {args.limit}", "evaluates no example.", "pass --limit N with N >= 1, or omit it"
        )
    caps = RolloutConfig().model_dump(include={"max_actions", "max_backspaces"})  # rollout.*'s defaults
    backspace = None if args.backspace is None else args.backspace == "on"
    try:  # the flags first: a wrong combination is wrong whatever the files hold
        dec = resolve_decoding(args.decoding, backspace)
        ma, mb = (caps[k] if getattr(args, k) is None else getattr(args, k) for k in caps)
        decoding_params(dec, args.temperature, args.top_p, args.samples, args.seed, ma, mb, args.bkspc_bias)
    except ValueError as e:
        raise UserError("sm-dist eval flags", f"{e}.", "see sm-dist eval --help") from None
    target = resolve_target(args.model)  # a model, a checkpoint or a run (sm_dist/eval/target.py)
    for k, v in {**caps, **target.defaults}.items():
        if getattr(args, k) is None:  # a flag wins; then the run's config.yaml; then rollout.*'s default
            setattr(args, k, v)
    _check_eval_data(args)
    check_model_dir(target.model_dir, "--model")
    max_model_len = engine_max_len(target.model_dir, args.max_model_len)
    keys = ("decoding", "temperature", "top_p", "samples", "seed", "force_error", "limit", "prompt_field",
            "answer_field", "on_bad", "max_actions", "max_backspaces", "bkspc_bias", "batch_size")  # fmt: skip
    log = log_path(args.log_file, args.out)
    for note in target.notes:
        print(f"sm-dist eval: {note}", file=sys.stderr)
    print(f"sm-dist eval: vLLM's output goes to {log}", file=sys.stderr)
    from sm_dist.orchestrator.cluster import set_process_env

    set_process_env()  # vLLM's CPU defaults, before vLLM is imported
    with to_log_file(log):  # file descriptors 1 and 2: vLLM prints from C++ and subprocesses too
        summary = evaluate(target.model_dir, args.data, backspace=backspace, progress=False,
                           max_model_len=max_model_len, **{k: getattr(args, k) for k in keys})  # fmt: skip
    summary["model_arg"] = str(args.model)
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(f"sm-dist eval: results written to {args.out}", file=sys.stderr)
    return 0


def _check_eval_data(args) -> None:
    """Every row of --data readable, and at least one usable (before the model and vLLM load)."""
    from sm_dist.data.datasets import load_examples, no_usable_examples

    kw = {"prompt_field": args.prompt_field, "answer_field": args.answer_field, "on_bad": args.on_bad}
    examples, report = load_examples(args.data, limit=args.limit, **kw)
    if not examples:
        raise no_usable_examples(f"--data {args.data}", args.data, report)


def _plot(args) -> int:
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        problem = "has no metrics.jsonl" if Path(args.run_dir).is_dir() else "does not exist"
        raise UserError(
            args.run_dir,
            f"{problem}; nothing to plot.",
            "pass the run.run_dir of a run that has logged steps",
        )
    from sm_dist.eval.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _text_metrics(args) -> int:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sm_dist.data.datasets import load_examples
    from sm_dist.eval.text_metrics import text_metrics

    if not (Path(args.model) / "config.json").is_file():
        raise ModelError(f"--model {args.model}", "is not an HF model folder (no config.json).", "pass one")
    examples, report = load_examples(args.data, text_field=args.field, on_bad=args.on_bad, limit=args.limit)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    samples = [tok.encode(e.prompt + e.answer, add_special_tokens=False) for e in examples]
    out = {**text_metrics(samples, model), "skipped": dict(report.skipped)}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


BENCHMARKS = {
    "learner-step": "learner_step.py",
    "rollout": "rollout.py",
    "weight-sync": "weight_sync.py",
    "pipeline": "pipeline.py",
    "gpu-equivalence": "gpu_equivalence.py",
    "arith": "arith_sm_vs_mle.py",
    "scaling": "scaling.py",
    "learner-memory": "learner_memory.py",
    "buffer-throughput": "buffer_throughput.py",
    "lora-rows": "lora_rows.py",
    "lora-sync": "lora_sync.py",
    "checkpoint-io": "checkpoint_io.py",
}


def _bench(args) -> int:
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    script = root / BENCHMARKS[args.name]
    if not script.exists():
        print(
            f"sm-dist bench: {script} not found; the benchmarks live in the sm-dist source tree "
            "(git clone, then pip install -e .), not in an installed wheel",
            file=sys.stderr,
        )
        return 2
    import os

    # the repo root on the path: a benchmark may share helpers with the tests (gpu_equivalence.py)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root.parent), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.call([sys.executable, str(script), *args.args], cwd=root.parent, env=env)


def _add_eval_parser(sub) -> None:
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
    ev.add_argument(
        "--backspace",
        choices=("on", "off"),
        default=None,
        help="legacy alias: on = --decoding search, off = --decoding greedy_no_bkspc",
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
    ev.set_defaults(func=_eval)


def _export(args) -> int:
    from sm_dist.learner.export import export

    ckpt = export(args.run_dir, args.out, args.dtype)
    print(f"{ckpt} exported to {args.out} (a plain HF folder, adapters merged)")
    return 0


def _add_model_parsers(sub) -> None:
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


def _add_run_parsers(sub) -> None:
    tr = sub.add_parser("train", help="run (or resume) a SequenceMatch job from a YAML config")
    tr.add_argument(
        "config",
        nargs="?",
        help="YAML config, e.g. configs/tiny-cpu.yaml (none with --resume: the saved one)",
    )
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-4 run.total_steps=50")
    tr.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, with its saved config.yaml and any "
        "overrides on top (e.g. run.total_steps=600 to lengthen it); a CONFIG given too must not differ",
    )
    tr.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    tr.set_defaults(func=_train)

    st = sub.add_parser("status", help="where a run stands: running or not, step, loss, checkpoint, buffer")
    st.add_argument("run_dir", help="a run directory written by `sm-dist train`")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(func=_status)

    ct = sub.add_parser(
        "ctl",
        help="talk to a live run's control API: status, health, metrics, scale N, pause, resume, checkpoint, stop",
    )
    ct.add_argument("run_dir", help="the run directory of a live `sm-dist train`")
    ct.add_argument(
        "command_name",
        metavar="command",
        choices=("status", "health", "metrics", "scale", "pause", "resume", "checkpoint", "stop"),
    )
    ct.add_argument("n", nargs="?", type=int, help="scale: the number of rollout workers")
    ct.set_defaults(func=_ctl)

    c = sub.add_parser(
        "config",
        help="validate a config and print it resolved (defaults, overrides, absolute paths), or list every key",
    )
    c.add_argument("config", nargs="?", help="YAML config (default: all defaults)")
    c.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    c.add_argument(
        "--reference",
        action="store_true",
        help="print every key with type, default and meaning (docs/config.md)",
    )
    c.set_defaults(func=_config)


def _add_analysis_parsers(sub) -> None:
    tm = sub.add_parser(
        "text-metrics", help="distinct-n, repetition, n-gram entropy and perplexity of texts under a model"
    )
    tm.add_argument("--model", required=True, help="HF model folder (perplexity and tokenisation)")
    tm.add_argument("--data", required=True, help="plain text (one sample a line) or jsonl with --field")
    tm.add_argument("--field", default=None, help="jsonl field holding each text (default: plain text file)")
    tm.add_argument("--on-bad", choices=["error", "skip"], default="error")
    tm.add_argument("--limit", type=int, default=None)
    tm.add_argument("--out", help="also write the JSON here")
    tm.set_defaults(func=_text_metrics)

    pl = sub.add_parser("plot", help="training curves of a run (metrics.jsonl) to PNG files")
    pl.add_argument("run_dir", help="a run directory written by `sm-dist train`")
    pl.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    pl.set_defaults(func=_plot)

    b = sub.add_parser(
        "bench",
        help="run a benchmark of benchmarks/ (its last line is `name: value`)",
        description="Benchmarks: "
        + ", ".join(f"{k} ({v})" for k, v in BENCHMARKS.items())
        + ". Arguments after the name go to the script (e.g. sm-dist bench learner-step -- --attn split).",
    )
    b.add_argument("name", choices=sorted(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    b.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sm-dist", description="SequenceMatch finetuning on Ray + vLLM")
    p.add_argument(
        "--log-level",
        default=None,
        help="console log level: DEBUG (also shows the actors' vLLM/Ray output), INFO (default), WARNING, "
        "ERROR; env SM_DIST_LOG_LEVEL. The run directory's driver.log always has DEBUG",
    )
    p.add_argument(
        "--log-json", action="store_true", help="console logs as JSON lines (env SM_DIST_LOG_JSON=1)"
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an input error instead of its one-line message (env SM_DIST_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_model_parsers(sub)
    _add_run_parsers(sub)
    _add_eval_parser(sub)
    _add_analysis_parsers(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line. `train`/`config` overrides may also follow the options
    (`train CONFIG --resume DIR key=value`): argparse leaves those over, and they are appended in order
    (`parse_intermixed_args` cannot be used with subcommands)."""
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command in ("train", "config") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _run_dir_of(args) -> str | None:
    """The run directory a failed `train` wrote to (for the --resume hint), where one is known."""
    return getattr(args, "resume", None) or getattr(args, "run_dir_used", None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    debug = args.debug or os.environ.get("SM_DIST_DEBUG", "") not in ("", "0", "false")
    from sm_dist.service.logs import setup_logging

    try:
        setup_logging(args.log_level, args.log_json or None)
    except ValueError as e:
        print(f"sm-dist: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        code = args.func(args)
    except UserError as e:  # the user's input, not our bug: one line, unless asked for the traceback
        if debug:
            raise
        print(f"sm-dist {args.command}: {one_line(e)}", file=sys.stderr)
        code = 2
    except Exception as e:  # a full disk or a read-only folder, wherever the write was: one line too
        fs = filesystem_error(e, _run_dir_of(args))
        if fs is None or debug:
            raise
        print(f"sm-dist {args.command}: {one_line(fs)}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
