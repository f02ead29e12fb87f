"""The `sm-dist` command line (also `python -m sm_dist`): one module per command group, `models.py`
(make-tiny-model, add-bkspc, export), `runs.py` (train, status, ctl, config), `evaluation.py` (eval)
and `analysis.py` (text-metrics, plot, bench).

One error boundary (`main`): a `sm_dist.errors.UserError` (a bad file, folder, value or checkpoint)
ends as one line on stderr, `sm-dist <command>: <input>: <problem> Fix: <fix>`, with exit code 2;
`--debug` or `SM_DIST_DEBUG=1` re-raises it with its traceback. Any other exception is a bug and keeps
its traceback. The commands check their inputs before they start anything slow.
"""

from __future__ import annotations

import argparse
import os
import sys

from sm_dist.cli.analysis import BENCHMARKS, add_analysis_parsers
from sm_dist.cli.evaluation import add_eval_parser
from sm_dist.cli.models import add_model_parsers
from sm_dist.cli.runs import add_run_parsers
from sm_dist.errors import UserError, filesystem_error, one_line

__all__ = ["BENCHMARKS", "build_parser", "main", "parse_args"]


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
    add_model_parsers(sub)
    add_run_parsers(sub)
    add_eval_parser(sub)
    add_analysis_parsers(sub)
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
