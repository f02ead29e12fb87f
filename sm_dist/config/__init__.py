"""The run configuration: pydantic v2 models, one module per section, and their loading.

Imports no torch, Ray, vLLM or transformers, so a config is validated before any process starts
(tests/unit/test_config_torch_free.py blocks them). Every section forbids unknown keys; every error
is a `ConfigError` naming the dotted key, the bad value and the fix. Each variant (the divergence,
the data format, the noise, the weight transport) is a member of a discriminated union selected by
its `kind`, with its own parameters; the kinds mirror registries in torch-side modules, which a test
compares (tests/unit/test_config_registries.py) instead of importing them at validation.

    base.py        ConfigError, Section, the union helpers
    model.py  data.py  objective.py  learner.py  rollout.py  run.py (buffer, sync, run)
    root.py        Config: the sections and their cross-section checks
    load.py        load_config (YAML + overrides -> validated, path-resolved Config), resume
    reference.py   dump_config, reference() (docs/config.md)
"""

from sm_dist.config.base import VLLM_CPU_HEAD_SIZES, ConfigError
from sm_dist.config.data import (
    DataConfig,
    ModelNoise,
    PlausibleNoise,
    RecordsFormat,
    TaskNoise,
    TextFormat,
    VocabNoise,
)
from sm_dist.config.learner import LearnerConfig
from sm_dist.config.load import (
    RUN_ROOT_ENV,
    SAVED_CONFIG,
    check_paths,
    config_from_dict,
    load_config,
    load_resume_config,
    parse_overrides,
    resolve_paths,
    resolve_run_dir,
)
from sm_dist.config.model import LoraSettings, ModelConfig, TinyModelConfig
from sm_dist.config.objective import Chi2Divergence, MleDivergence, ObjectiveConfig, PhiDivergence
from sm_dist.config.reference import dump_config, reference
from sm_dist.config.rollout import EngineConfig, RolloutConfig
from sm_dist.config.root import Config
from sm_dist.config.run import BufferConfig, RunConfig, SyncConfig, step_limit
from sm_dist.sync.config import GlooConfig, NcclConfig, ObjectStoreConfig, TransportConfig

__all__ = [
    "RUN_ROOT_ENV",
    "SAVED_CONFIG",
    "VLLM_CPU_HEAD_SIZES",
    "BufferConfig",
    "Chi2Divergence",
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "GlooConfig",
    "LearnerConfig",
    "LoraSettings",
    "MleDivergence",
    "ModelConfig",
    "ModelNoise",
    "NcclConfig",
    "ObjectStoreConfig",
    "ObjectiveConfig",
    "PhiDivergence",
    "PlausibleNoise",
    "RecordsFormat",
    "RolloutConfig",
    "RunConfig",
    "step_limit",
    "SyncConfig",
    "TaskNoise",
    "TextFormat",
    "TinyModelConfig",
    "TransportConfig",
    "VocabNoise",
    "check_paths",
    "config_from_dict",
    "dump_config",
    "load_config",
    "load_resume_config",
    "parse_overrides",
    "reference",
    "resolve_paths",
    "resolve_run_dir",
]
