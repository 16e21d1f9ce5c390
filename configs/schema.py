"""Typed, strict job configs: Pydantic dataclasses whose field constraints are both the validator
and the JSON Schema that /openapi.json publishes, so the two cannot drift apart.

``parse_config`` reports every bad field at once, one message per field (``training.lr``), and
raises nothing but ConfigError for any JSON- or YAML-like input, however odd.
"""
import dataclasses
import functools
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from configs.errors import ConfigError, FieldError, field_errors, short
from configs.fields import (
    BUILTIN_DATASETS, CUSTOM_MODELS, MODEL_NAMES, TORCHVISION_MODELS, Auto, Bool, Dataset, Device, LocalPath,
    ModelName, ModelRef, f, integer, number, one_of,
)
from configs.names import JOB_KINDS, MODEL_REF_RE, NAME_RE
from configs.overrides import apply_overrides, read_mapping

__all__ = [
    "BUILTIN_DATASETS", "CUSTOM_MODELS", "ConfigError", "DataConfig", "FieldError", "MODEL_NAMES",
    "MODEL_REF_RE", "ModelConfig", "PredictConfig", "PredictDataConfig", "TORCHVISION_MODELS", "TrainConfig",
    "TrainingConfig", "apply_overrides", "dump_yaml", "json_schema", "load_config", "load_predict_config",
    "parse_config", "to_dict",
]


def _config(*rules: dict) -> ConfigDict:
    """Unknown keys refused; ``rules`` (JSON Schema) publish the class's cross-field checks."""
    return ConfigDict(extra="forbid", json_schema_extra={"allOf": list(rules)} if rules else None)


def _root_rule(default_dataset: str) -> dict:
    """JSON Schema of the root check in ``_cross_checks``: required with imagefolder, refused otherwise."""
    is_folder: dict = {"properties": {"dataset": {"const": "imagefolder"}}}
    if default_dataset != "imagefolder":  # an absent dataset is the default one
        is_folder["required"] = ["dataset"]
    return {"if": is_folder, "then": {"required": ["root"], "properties": {"root": {"type": "string"}}},
            "else": {"properties": {"root": {"type": "null"}}}}


ONECYCLE_RULE = {"if": {"required": ["scheduler"], "properties": {"scheduler": {"const": "onecycle"}}},
                 "then": {"properties": {"warmup_epochs": {"const": 0}}}}
BATCH_SIZE_DEFAULT = 128


@dataclass(frozen=True, config=_config())
class ModelConfig:
    """The network: architecture, head size, input channels, dropout, optional initial weights."""
    name: ModelName = f("small_cnn", "architecture: small_cnn, mlp or a torchvision classification model")
    num_classes: Union[integer(2, 100_000), Auto] = f("auto", "number of classes; auto = from the dataset")
    in_channels: Union[one_of(1, 3), Auto] = f("auto", "input channels (1 or 3); auto = from the dataset")
    dropout: number(ge=0.0, lt=1.0) = f(0.0, "dropout before the classifier")
    channels_last: Bool = f(True, "use channels_last memory format (faster convs on GPU)")
    weights: Optional[LocalPath] = f(None, "path of initial weights (a state_dict) under an allowed data root; "
                                           "no hub downloads")


@dataclass(frozen=True, config=_config(_root_rule("digits")))
class DataConfig:
    """The dataset, its split and how it is loaded."""
    dataset: Dataset = f("digits", "digits, fake, imagefolder (with root) or an uploaded dataset id")
    root: Optional[LocalPath] = f(None, "folder in ImageFolder layout (dataset: imagefolder) under an allowed "
                                        "data root")
    image_size: integer(8, 1024) = f(32, "images are resized to image_size x image_size")
    val_split: number(gt=0.0, lt=1.0) = f(0.2, "fraction of samples held out for validation")
    num_workers: Union[integer(0, 64), Auto] = f("auto", "DataLoader worker processes; auto = by CPU count")
    augment: Bool = f(True, "train-time augmentation (random crop / flip where sensible)")
    subset: Optional[integer(2, 100_000_000)] = f(None, "use only the first N samples (quick runs)")
    fake_samples: integer(2, 1_000_000) = f(512, "number of samples of the fake dataset")
    fake_classes: integer(2, 1000) = f(10, "number of classes of the fake dataset")


@dataclass(frozen=True, config=_config())
class ProfileConfig:
    """torch.profiler over a few training steps: profile/trace.json and the top operators in train.log."""
    steps: integer(1, 100) = f(5, "optimizer steps recorded, after 2 warm-up steps")


@dataclass(frozen=True, config=_config())
class GradAlertConfig:
    """Per-layer gradient norm thresholds: a warning naming the layer, and grad_alerts per epoch."""
    max_norm: Optional[number(ge=1.0, le=1e12)] = f(100.0, "warn when a layer's gradient norm exceeds this")
    min_norm: Optional[number(ge=0.0, lt=1.0)] = f(1e-7, "warn when a layer's gradient norm falls under this")


@dataclass(frozen=True, config=_config(ONECYCLE_RULE))
class TrainingConfig:
    """Optimisation: epochs, batches, optimizer and schedule, precision, checkpoints, devices."""
    epochs: integer(1, 10_000) = f(10, "number of passes over the training split")
    batch_size: integer(1, 65_536) = f(BATCH_SIZE_DEFAULT, "samples per optimizer micro-batch (the global batch: "
                                                            "a multiple of processes, each rank takes its share)")
    optimizer: Literal["sgd", "adam", "adamw"] = f("adamw", "sgd, adam or adamw")
    lr: number(gt=0.0, le=10.0) = f(1e-3, "peak learning rate")
    momentum: number(ge=0.0, lt=1.0) = f(0.9, "momentum (sgd)")
    weight_decay: number(ge=0.0, le=1.0) = f(1e-4, "weight decay")
    scheduler: Literal["none", "cosine", "step", "onecycle", "warmup"] = f(
        "cosine", "none, cosine, step, onecycle or warmup")
    warmup_epochs: integer(0, 10_000) = f(0, "linear warm-up epochs (scheduler: warmup, cosine)")
    step_size: integer(1, 10_000) = f(10, "epochs between lr decays (scheduler: step)")
    gamma: number(gt=0.0, le=1.0) = f(0.1, "lr decay factor (scheduler: step)")
    label_smoothing: number(ge=0.0, lt=1.0) = f(0.0, "label smoothing of the cross-entropy loss")
    grad_accum_steps: integer(1, 1024) = f(1, "micro-batches per optimizer step")
    grad_clip: Optional[number(gt=0.0, le=1e6)] = f(None, "clip the global gradient norm to this value")
    amp: Literal["auto", "bf16", "fp16", "off"] = f(
        "auto", "mixed precision: auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16, off")
    grad_checkpointing: Bool = f(False, "recompute activations in backward to save memory")
    seed: integer(0, 2**32 - 1) = f(42, "seed for torch, numpy, python and the data split")
    deterministic: Bool = f(False, "deterministic algorithms (slower; bit-exact resume on CPU)")
    early_stopping_patience: Optional[integer(1, 10_000)] = f(None, "stop after N epochs without improvement")
    checkpoint_every: integer(1, 10_000) = f(1, "write last.pt every N epochs")
    keep_every: Optional[integer(1, 10_000)] = f(None, "also keep checkpoints/epoch-<N>.pt every N epochs "
                                                       "(last.pt and best.pt are always kept)")
    log_every_steps: integer(1, 1_000_000) = f(10, "log and record step metrics every N optimizer steps")
    debug: Bool = f(False, "log per-layer activation ranges and check every step for NaN/Inf")
    device: Device = f("auto", "auto, cpu, mps, cuda or cuda:N (N <= 63)")
    processes: Union[integer(1, 64), Auto] = f(1, "ranks on one host, one per GPU; auto = one per visible GPU")
    profile: Optional[ProfileConfig] = f(None, "record a torch.profiler trace of a few steps; null: off")
    grad_alert: Optional[GradAlertConfig] = f(GradAlertConfig(), "gradient norm alerts per layer; null: off")


GATE_METRICS = ("val_accuracy", "val_loss")  # what a job's best metrics hold (ml.train's run.best)
RegistryName = Annotated[str, Strict(), Field(pattern=NAME_RE, max_length=64)]


# One metric's bound in a register gate: {"min": x}, {"max": y} or both, inclusive; {} only asks that the
# metric was recorded. A plain mapping, so the stored config holds what was given and parses again as it is.
GateBound = dict[Literal["min", "max"], number(ge=-1e9, le=1e9)]


@dataclass(frozen=True, config=_config())
class RegisterConfig:
    """Train to production: when the job succeeds and its best metrics pass ``require``, its best
    checkpoint becomes the next version of ``name`` and ``alias`` moves to it (worker.promote)."""
    name: RegistryName = Field(description="model name the version is registered under")
    alias: Optional[RegistryName] = f(None, "alias moved to the new version (production, staging, ...)")
    require: dict[Literal[GATE_METRICS], GateBound] = Field(
        default_factory=dict, description="the gate: {metric: {min, max}} over the job's best metrics; "
                                          "empty = always register")


@dataclass(frozen=True, config=_config())
class TrainConfig:
    """A training job: model, data and training sections."""
    model: ModelConfig = Field(default_factory=ModelConfig, description="model architecture")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset and loading")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="optimisation")
    register: Optional[RegisterConfig] = f(None, "register the best checkpoint when the job passes a gate")


@dataclass(frozen=True, config=_config(_root_rule("imagefolder")))
class PredictDataConfig:
    """The images a batch-inference job predicts."""
    dataset: Dataset = f("imagefolder", "an uploaded dataset id, imagefolder (with root) or digits")
    root: Optional[LocalPath] = f(None, "folder of images (dataset: imagefolder) under an allowed data root; "
                                        "labelled if in class folders")
    subset: Optional[integer(1, 100_000_000)] = f(None, "use only the first N samples")


@dataclass(frozen=True, config=_config())
class PredictConfig:
    """A batch-inference job: a registered model over a dataset."""
    model: ModelRef = Field(description="model reference: name, name:version or name@alias")
    data: PredictDataConfig = Field(description="images to predict")  # no default: imagefolder needs a root
    batch_size: integer(1, 65_536) = f(256, "images per forward pass")
    top_k: integer(1, 1000) = f(5, "probabilities reported per image")
    device: Device = f("auto", "auto, cpu, mps, cuda or cuda:N (N <= 63)")


CLASSES = {"train": TrainConfig, "predict": PredictConfig}


# ---------------------------------------------------------------- validation

@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _cross_checks(cfg: Any) -> list[FieldError]:
    """Rules that span fields (published as the classes' JSON Schema ``allOf``)."""
    own = getattr(cfg, "field_errors", None)
    if own is not None:  # a kind with rules of its own (configs.sweep.SweepConfig)
        return own()
    errors = []
    data = cfg.data
    if data.dataset == "imagefolder" and not data.root:
        errors.append(FieldError("data.root", "is required when data.dataset is imagefolder"))
    if data.dataset != "imagefolder" and data.root:
        errors.append(FieldError("data.root", "is only used with data.dataset: imagefolder"))
    if isinstance(cfg, TrainConfig) and cfg.training.scheduler == "onecycle" and cfg.training.warmup_epochs:
        errors.append(FieldError("training.warmup_epochs", "is not used with scheduler: onecycle"))
    if isinstance(cfg, TrainConfig) and isinstance(cfg.training.processes, int) \
            and cfg.training.batch_size % cfg.training.processes:
        # Not published in the JSON Schema: "a multiple of another field" takes one if/then per value of
        # processes, and 63 of them make the schema too large for clients' generators (schemathesis).
        t = cfg.training
        errors.append(FieldError("training.batch_size", f"{t.batch_size} is the global batch and must be a multiple "
                                                        f"of training.processes ({t.processes})"))
    return errors


def parse_config(data: Any, kind: str = "train") -> Any:
    """Validate a plain mapping into a TrainConfig (kind=train) or PredictConfig (kind=predict)."""
    cls = CLASSES.get(kind) if isinstance(kind, str) and kind in JOB_KINDS else None
    if cls is None:
        raise ConfigError([FieldError("kind", f"unknown kind {short(kind)}; expected {' or '.join(JOB_KINDS)}")])
    try:
        cfg = _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise ConfigError(field_errors(exc, cls)) from None
    errors = _cross_checks(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a training config from a YAML path or a mapping, applying dotted overrides."""
    return parse_config(apply_overrides(read_mapping(source), overrides), "train")


def load_predict_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> PredictConfig:
    """Load a batch-inference config from a YAML path or a mapping."""
    return parse_config(apply_overrides(read_mapping(source), overrides), "predict")


def to_dict(cfg: Any) -> dict:
    """The config as plain data (what checkpoints and the job store keep)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    """The config as YAML, keys in field order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- JSON Schema

def json_schema(cls: type) -> dict:
    """JSON Schema of a config class, generated by Pydantic from the validator's own constraints.

    Nested sections are inlined (no ``$ref``), so the document can sit in OpenAPI's components.
    """
    raw = _adapter(cls).json_schema()
    return _inline(raw, raw.pop("$defs", {}))


def _inline(node: Any, defs: dict) -> Any:
    """``node`` with each ``$ref`` replaced by its definition and Pydantic's titles dropped."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _inline(sub, defs) for name, sub in value.items()}
        elif key != "title":
            out[key] = _inline(value, defs)
    return out
