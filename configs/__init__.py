"""Kiln configuration: the job-config schema (Pydantic dataclasses) and service settings.

Nothing here imports torch, flask or celery, so every layer can use it cheaply.
"""
from configs.schema import (
    ConfigError,
    DataConfig,
    FieldError,
    ModelConfig,
    PredictConfig,
    PredictDataConfig,
    TrainConfig,
    TrainingConfig,
    apply_overrides,
    dump_yaml,
    json_schema,
    load_config,
    load_predict_config,
    parse_config,
    to_dict,
)
from configs.settings import Settings
from configs.sweep import SweepConfig  # registers kind sweep with parse_config

__all__ = [
    "ConfigError", "DataConfig", "FieldError", "ModelConfig", "PredictConfig",
    "PredictDataConfig", "Settings", "SweepConfig", "TrainConfig", "TrainingConfig", "apply_overrides",
    "dump_yaml", "json_schema", "load_config", "load_predict_config", "parse_config", "to_dict",
]
