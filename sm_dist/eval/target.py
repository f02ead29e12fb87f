"""What `sm-dist eval --model PATH` evaluates, and with which limits and decoding defaults.

PATH may be
* a model folder (`config.json` in it): evaluated as is. `RUN/model` of a run is its *start* model
  (what `sm-dist train` began from, before any of its steps), not the trained one; a note says so.
* a checkpoint folder (`RUN/checkpoints/step-N`): its trained weights, `step-N/model`;
* a run directory (`config.yaml` and `checkpoints/`): the newest intact checkpoint's weights
  (`sm_dist.learner.checkpoint.verify`; a damaged newer one is skipped with a note).

For a checkpoint or a run, the decoding defaults (`max_actions`, `max_backspaces`) come from the run's
saved `config.yaml` (the `rollout` section training used), else from `RolloutConfig`'s defaults; a flag
given on the command line wins. The engine's context length defaults to the model's own
(`max_position_embeddings`, or `n_positions` / `max_seq_len` / `seq_length` / `max_sequence_length`,
as vLLM derives it), capped at `DEFAULT_MAX_MODEL_LEN`. Imports nothing heavy (no torch, Ray or vLLM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sm_dist.errors import ModelError, UserError

DEFAULT_MAX_MODEL_LEN = 2048  # the default engine context when the model allows more (KV cache on a CPU)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
RUN_DEFAULTS = ("max_actions", "max_backspaces")  # rollout.* keys that become eval defaults


@dataclass
class EvalTarget:
    model_dir: Path  # the HF folder the engine loads
    kind: str  # "model" | "checkpoint" | "run"
    defaults: dict = field(default_factory=dict)  # decoding defaults from the run's config.yaml
    notes: list[str] = field(default_factory=list)  # said on stderr (how PATH was resolved)


def resolve_target(path: str | Path, what: str = "--model") -> EvalTarget:
    """The model folder PATH stands for, and the run's decoding defaults (module docstring)."""
    from sm_dist.learner import checkpoint as ckpt

    p = Path(path)
    if (p / "config.json").is_file():
        t = EvalTarget(p, "model")
        if p.name == "model" and (p.parent / "config.yaml").is_file():
            t.notes.append(
                f"{p} is the run's start model (before training); pass {p.parent} for its newest checkpoint"
            )
        return t
    if (p / "model" / "config.json").is_file() and (
        p.parent.name == "checkpoints" or (p / ckpt.MANIFEST).is_file()
    ):
        problem, _ = ckpt.verify(p)
        if problem is not None:
            raise ModelError(
                f"{what} {p}",
                f"is a damaged checkpoint: {problem}.",
                "pass an intact one, or the run directory",
            )
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        return EvalTarget(p / "model", "checkpoint", run_defaults(run), [f"evaluating checkpoint {p}"])
    if (p / "config.yaml").is_file() or (p / "checkpoints").is_dir():
        return _run_target(p, what)
    problem = "does not exist" if not p.exists() else "is not a model folder, a checkpoint or a run directory"
    raise ModelError(
        f"{what} {p}",
        f"{problem}.",
        "pass an HF model folder with <bkspc>, a run directory (RUN) or one of its RUN/checkpoints/step-N",
    )


def _run_target(run: Path, what: str) -> EvalTarget:
    """The newest intact checkpoint of the run directory `run`."""
    from sm_dist.learner import checkpoint as ckpt

    notes = []
    for c in reversed(ckpt.list_checkpoints(run)):
        problem, _ = ckpt.verify(c)
        if problem is None:
            notes.append(f"evaluating {c} (the newest intact checkpoint of {run})")
            return EvalTarget(c / "model", "run", run_defaults(run), notes)
        notes.append(f"skipped {c}: {problem}")
    raise ModelError(
        f"{what} {run}",
        "is a run directory with no intact checkpoint." + (f" ({'; '.join(notes)})" if notes else ""),
        f"pass {run / 'model'} to evaluate the run's start model, or train until a checkpoint is written",
    )


def run_defaults(run: Path | None) -> dict:
    """`rollout.max_actions` / `rollout.max_backspaces` of the run's saved config.yaml ({} if none)."""
    if run is None or not (run / "config.yaml").is_file():
        return {}
    import yaml

    try:
        rollout = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("rollout") or {}
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{run / 'config.yaml'}", f"cannot be read ({e}).", "restore the run's config.yaml"
        ) from None
    return {k: rollout[k] for k in RUN_DEFAULTS if isinstance(rollout.get(k), int)}


def model_positions(model_dir: str | Path) -> int | None:
    """The model's own context length from its config.json (module docstring), or None if it names none."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = {**config.get("text_config", {}), **config}
    return next((int(config[k]) for k in POSITION_KEYS if isinstance(config.get(k), int)), None)


def engine_max_len(model_dir: str | Path, requested: int | None) -> int:
    """The engine's context length: `requested` (--max-model-len), checked against the model's, or the
    model's capped at DEFAULT_MAX_MODEL_LEN."""
    positions = model_positions(model_dir)
    if requested is None:
        return min(positions or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    if requested < 8:
        raise UserError(
            f"--max-model-len {requested}", "is too short for a prompt and an answer.", "pass 8 or more"
        )
    if positions is not None and requested > positions:
        raise UserError(
            f"--max-model-len {requested}",
            f"is more than the model's {positions} positions ({Path(model_dir) / 'config.json'}).",
            f"pass --max-model-len {positions} or less, or omit it",
        )
    return requested


def check_prompt_lengths(prompt_lens: list[int], max_model_len: int, data: str) -> None:
    """Every prompt must leave the engine room for at least one action."""
    longest = max(prompt_lens, default=0)
    if longest >= max_model_len:
        i = prompt_lens.index(longest)
        raise UserError(
            f"--data {data}",
            f"example {i} has a {longest}-token prompt; the engine takes {max_model_len} tokens in all.",
            "pass a larger --max-model-len (up to the model's positions), or data with shorter prompts",
        )
