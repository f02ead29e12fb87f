"""Config loading: every error names the dotted key; the CLI exits non-zero; the example configs validate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from sm_dist.config import Config, ConfigError, load_config
from sm_dist.config.base import variants

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")


def test_import_needs_no_ml_stack():
    code = "import sys, sm_dist.config; print([m for m in ('torch', 'ray', 'vllm') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tiny_config_resolves_paths(tmp_path):
    cfg = load_config(TINY, [f"run.run_dir={tmp_path / 'r'}", "learner.lr=5e-4", "learner.betas=[0.8, 0.9]"])
    assert cfg.model.dir == str(tmp_path / "r" / "model")
    assert Path(cfg.data.train_path).is_absolute()
    assert cfg.learner.lr == 5e-4 and cfg.learner.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.lrr=1", "learner.lrr"),
        ("rollout.engine.colour=red", "rollout.engine.colour"),
        ("learner.lr=fast", "learner.lr"),
        ("objective.divergence.kind=tv", "objective.divergence"),
        ("rollout.num_workers=0", "rollout.num_workers"),
        (
            "learner.batch_size=12",
            "learner.batch_size",
        ),  # num_learners=2, replay 0.25: 3 + 9 rows do not split
        ("model.tiny.hidden_size=48", "model.tiny"),
        ("rollout.engine.max_model_len=16", "rollout.engine.max_model_len"),
        ("learner.strategy=zero3", "learner.strategy"),
        ("sync.transport.kind=nccl", "sync.transport"),  # nccl on a CPU-only config
        ("run.total_steps=null", "run.total_steps"),  # run until stopped, with the cosine schedule
        ("run.total_steps=0", "run.total_steps"),
        ("learner.attn=flex", "learner.attn"),  # FlexAttention has no CPU backward
        ("data.fallback=arith_hard", "data.fallback"),  # the path names the easy split
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["learner.num_learners=2", "learner.batch_size=8", override])
    assert e.value.key == key, str(e.value)
    assert key in str(e.value)


def test_shipped_data_is_in_the_repo_and_a_missing_file_is_an_error(tmp_path):
    """The default data is the bundled sample (no ../shared needed); a missing file stops with the fix
    unless a matching fallback is asked for explicitly."""
    cfg = load_config(TINY, [f"run.run_dir={tmp_path / 'r'}"])
    assert Path(cfg.data.train_path).exists() and "configs/data/arith" in cfg.data.train_path
    missing = f"data.train_path={tmp_path / 'add_or_sub_in_base.train-medium.jsonl'}"
    with pytest.raises(ConfigError, match="data.fallback=arith_medium") as e:
        load_config(TINY, [missing, "data.fallback=none"])
    assert e.value.key == "data.train_path"
    cfg = load_config(TINY, [missing, "data.fallback=arith_medium"])  # explicit and matching: allowed
    assert cfg.data.fallback == "arith_medium"


def test_missing_model_dir_and_file(tmp_path):
    with pytest.raises(ConfigError, match="model.dir") as e:
        load_config(TINY, [f"model.dir={tmp_path / 'nope'}", "model.make_tiny_if_missing=false"])
    assert "add-bkspc" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(TINY, ["learner.lr"])


@pytest.mark.parametrize(
    "args, key",
    [
        (["learner.bogus=1"], "learner.bogus"),
        (["learner.lr=abc"], "learner.lr"),
        (["model.dir=/nonexistent/m", "model.make_tiny_if_missing=false"], "model.dir"),
    ],
)
def test_cli_exits_nonzero_naming_the_key(args, key):
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "train", TINY, *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert f"`{key}`" in out.stderr


def test_too_many_resources_names_rollout_keys():
    from sm_dist.orchestrator.actors import check_resources

    class FakeRay:
        @staticmethod
        def cluster_resources():
            return {"CPU": 2.0}

    cfg = load_config(TINY, ["rollout.num_workers=8", "rollout.cpus_per_worker=1"])
    with pytest.raises(ConfigError) as e:
        check_resources(FakeRay, cfg)
    assert e.value.key == "rollout.num_workers"
    assert "rollout.cpus_per_worker" in str(e.value) and "= 9.0 CPUs" in str(e.value)
    gpu = load_config(TINY, ["rollout.gpus_per_worker=1"])
    with pytest.raises(ConfigError, match="rollout.gpus_per_worker"):
        check_resources(FakeRay, gpu)


def test_learner_bundles_carry_the_custom_resources_the_cluster_must_have():
    from sm_dist.orchestrator.actors import check_resources, learner_bundle

    cfg = load_config(TINY, ["learner.num_learners=2", "learner.resources={learner_node: 1}"])
    assert learner_bundle(cfg) == {"CPU": 1.0, "learner_node": 1.0}  # no GPU entry on a CPU run

    class FakeRay:
        @staticmethod
        def cluster_resources():
            return {"CPU": 8.0, "learner_node": 1.0}

    with pytest.raises(ConfigError) as e:
        check_resources(FakeRay, cfg)
    assert e.value.key == "learner.resources" and "2 learners x 1.0 'learner_node'" in str(e.value)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    cfg = load_config(path, paths=False)  # schema and cross-field checks; paths exist only on their cluster
    assert cfg.run.total_steps >= 1
    assert Config.model_validate(yaml.safe_load(path.read_text())) == cfg


@pytest.mark.parametrize(
    "override, new",
    [
        ("objective.chi2_weight=0.01", "objective.divergence.chi2_weight"),
        ("objective.weight_clip=5", "objective.divergence.weight_clip"),
        ("data.noise_path=n.jsonl", "data.noise.path"),
        ("data.text_field=text", "data.format.text_field"),
        ("data.prompt_field=q", "data.format.prompt_field"),
    ],
)
def test_a_key_of_the_old_layout_names_its_new_place(override, new):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert e.value.key == override.split("=")[0] and f"moved to {new}" in str(e.value)
    assert "\n" not in str(e.value)


def test_variants_by_kind_with_their_own_parameters(tmp_path):
    base = [f"run.run_dir={tmp_path / 'r'}"]
    cfg = load_config(TINY, [*base, "objective.divergence.chi2_weight=0.02"])  # the shipped kind, one knob
    assert (cfg.objective.divergence.kind, cfg.objective.divergence.chi2_weight) == ("chi2_mixture", 0.02)
    cfg = load_config(TINY, [*base, "objective.divergence.kind=kl", "objective.divergence.weight_clip=3"])
    assert cfg.objective.divergence.model_dump() == {"kind": "kl", "data_mix": 0.5, "weight_clip": 3.0}
    assert load_config(TINY, [*base, "objective.divergence.kind=mle"]).objective.params(7).divergence == "mle"
    with pytest.raises(ConfigError, match="unknown key for kind mle") as e:  # chi2_weight is not mle's
        load_config(TINY, [*base, "objective.divergence.kind=mle", "objective.divergence.chi2_weight=0.1"])
    assert e.value.key == "objective.divergence.chi2_weight"
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [*base, "data.noise.kind=model"])  # model noise needs its file
    assert e.value.key == "data.noise.path"
    cfg = load_config(
        TINY, [*base, "data.noise.kind=model", "data.noise.path=n.jsonl", "data.format.kind=text"]
    )
    assert (cfg.data.noise.path, cfg.data.format.load_kwargs()) == (
        "n.jsonl",
        {"fmt": "text", "prompt_chars": 0},
    )
    cfg = load_config(TINY, [*base, "sync.transport.kind=gloo"])
    assert cfg.sync.transport.kind == "gloo"


def test_reference_lists_every_key_with_a_description_and_docs_are_current():
    from sm_dist.config import reference

    text = reference()

    def keys(cls, prefix=""):
        for name, f in cls.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from keys(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", f
                for v in variants(ann):  # each kind of a union: its own parameters
                    yield from keys(v, f"{prefix}{name}.")

    assert "| `objective.divergence.chi2_weight` |" in text and "| `data.noise.path` |" in text
    for key, f in keys(Config):
        assert f.description, f"{key} has no description"
        assert f"| `{key}` |" in text, key
    assert "&lt;bkspc>" in text and "`<run_dir>/model`" in text  # escaped outside code spans only
    doc = (ROOT / "docs" / "config.md").read_text()
    assert doc == text, "docs/config.md is stale: run `sm-dist config --reference > docs/config.md`"


def test_config_command_prints_the_resolved_config_or_names_the_bad_key(tmp_path):
    run = [sys.executable, "-m", "sm_dist", "config", TINY, "learner.lr=0.01", f"run.run_dir={tmp_path}"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    cfg = Config.model_validate(yaml.safe_load(out.stdout))
    assert cfg.learner.lr == 0.01 and cfg.run.run_dir == str(tmp_path)
    assert cfg.model.dir == str(tmp_path / "model")  # resolved: null -> <run_dir>/model
    bad = subprocess.run(
        [*run[:4], TINY, "rollout.engine.colour=red"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2 and "rollout.engine.colour" in bad.stderr and "max_model_len" in bad.stderr


def test_total_steps_null_runs_until_stopped_with_a_constant_schedule():
    cfg = load_config(TINY, ["run.total_steps=null", "learner.schedule=constant"])
    assert cfg.run.total_steps is None


@pytest.mark.parametrize(
    "over",
    ["objective.divergence=mle", "sync.transport=gloo", "data.noise=task", "data.format=jsonl"],
)
def test_a_bare_variant_name_is_refused_naming_both_fixes(tmp_path, over):
    """No shorthand: a variant is a mapping with its kind, in the file and on the command line."""
    key, _, name = over.partition("=")
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"run.run_dir={tmp_path / 'r'}", over])
    assert e.value.key == key, e.value
    assert f"{key}: {{kind: {name}}}" in str(e.value) and f"{key}.kind={name}" in str(e.value), e.value


def test_setting_a_kind_replaces_the_variant_keeping_the_same_kinds_parameters(tmp_path):
    base = [f"run.run_dir={tmp_path / 'r'}", "objective.divergence.chi2_weight=0.02"]
    same = load_config(TINY, [*base, "objective.divergence.kind=chi2_mixture"]).objective.divergence
    assert same.chi2_weight == 0.02  # the same kind again: its parameters stay
    assert load_config(TINY, [*base, "objective.divergence.kind=mle"]).objective.divergence.model_dump() == {
        "kind": "mle"
    }
