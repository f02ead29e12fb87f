"""`sm-dist train`, `status`, `ctl` and `config`: a run, its state, its control API, its config."""

from __future__ import annotations

from pathlib import Path

from sm_dist.errors import UserError


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


def _add_train_parser(sub) -> None:
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


def add_run_parsers(sub) -> None:
    _add_train_parser(sub)

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
