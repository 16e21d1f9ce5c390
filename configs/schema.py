"""Typed, strict job configs: dataclasses + one recursive validator.

Each field carries its constraints in ``metadata`` (``choices``, ``min``, ``max``,
``gt``, ``lt``, ``pattern``, ``help``); the same metadata drives validation and
the JSON Schema that the HTTP API publishes, so the two cannot drift apart.
Validation reports every bad field at once, one message per field.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from configs.names import ID_RE, JOB_KINDS, MODEL_REF_RE

# Fixed registry of model names. torchvision names are listed here (not imported)
# so that the web process can validate a config without paying `import torch`;
# tests/unit/test_models.py checks each against torchvision's own registry.
CUSTOM_MODELS = ("small_cnn", "mlp")
TORCHVISION_MODELS = (
    "alexnet", "convnext_tiny", "convnext_small", "densenet121", "densenet161",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_v2_s",
    "googlenet", "mnasnet0_5", "mnasnet1_0", "mobilenet_v2", "mobilenet_v3_large",
    "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet34",
    "resnet50", "resnet101", "resnext50_32x4d", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "squeezenet1_0", "squeezenet1_1", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn",
    "vit_b_16", "wide_resnet50_2",
)
MODEL_NAMES = CUSTOM_MODELS + TORCHVISION_MODELS
BUILTIN_DATASETS = ("digits", "fake", "imagefolder")  # or an uploaded dataset's id (configs.names.ID_RE)

Auto = Literal["auto"]


def _f(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field with its validation rules and help text as metadata."""
    return field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("small_cnn", "architecture: small_cnn, mlp or a torchvision classification model",
                   choices=MODEL_NAMES)
    num_classes: Union[int, Auto] = _f("auto", "number of classes; auto = from the dataset", min=2)
    in_channels: Union[int, Auto] = _f("auto", "input channels (1 or 3); auto = from the dataset",
                                       choices=(1, 3, "auto"))
    dropout: float = _f(0.0, "dropout before the classifier", min=0.0, lt=1.0)
    channels_last: bool = _f(True, "use channels_last memory format (faster convs on GPU)")
    weights: Union[str, None] = _f(None, "local path of initial weights (a state_dict); no hub downloads")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("digits", "digits, fake, imagefolder (with root) or an uploaded dataset id",
                      choices=BUILTIN_DATASETS, pattern=ID_RE)
    root: Union[str, None] = _f(None, "folder in ImageFolder layout (dataset: imagefolder)")
    image_size: int = _f(32, "images are resized to image_size x image_size", min=8, max=1024)
    val_split: float = _f(0.2, "fraction of samples held out for validation", gt=0.0, lt=1.0)
    num_workers: Union[int, Auto] = _f("auto", "DataLoader worker processes; auto = by CPU count", min=0, max=64)
    augment: bool = _f(True, "train-time augmentation (random crop / flip where sensible)")
    subset: Union[int, None] = _f(None, "use only the first N samples (quick runs)", min=2)
    fake_samples: int = _f(512, "number of samples of the fake dataset", min=2, max=1_000_000)
    fake_classes: int = _f(10, "number of classes of the fake dataset", min=2, max=1000)


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = _f(10, "number of passes over the training split", min=1, max=10_000)
    batch_size: int = _f(128, "samples per optimizer micro-batch", min=1, max=65_536)
    optimizer: str = _f("adamw", "sgd, adam or adamw", choices=("sgd", "adam", "adamw"))
    lr: float = _f(1e-3, "peak learning rate", gt=0.0, max=10.0)
    momentum: float = _f(0.9, "momentum (sgd)", min=0.0, lt=1.0)
    weight_decay: float = _f(1e-4, "weight decay", min=0.0, max=1.0)
    scheduler: str = _f("cosine", "none, cosine, step, onecycle or warmup",
                        choices=("none", "cosine", "step", "onecycle", "warmup"))
    warmup_epochs: int = _f(0, "linear warm-up epochs (scheduler: warmup, cosine)", min=0)
    step_size: int = _f(10, "epochs between lr decays (scheduler: step)", min=1)
    gamma: float = _f(0.1, "lr decay factor (scheduler: step)", gt=0.0, max=1.0)
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss", min=0.0, lt=1.0)
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step", min=1, max=1024)
    grad_clip: Union[float, None] = _f(None, "clip the global gradient norm to this value", gt=0.0)
    amp: str = _f("auto", "mixed precision: auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16, off",
                  choices=("auto", "bf16", "fp16", "off"))
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    seed: int = _f(42, "seed for torch, numpy, python and the data split", min=0, max=2**32 - 1)
    deterministic: bool = _f(False, "deterministic algorithms (slower; bit-exact resume on CPU)")
    early_stopping_patience: Union[int, None] = _f(None, "stop after N epochs without improvement", min=1)
    checkpoint_every: int = _f(1, "write last.pt every N epochs", min=1)
    log_every_steps: int = _f(10, "log and record step metrics every N optimizer steps", min=1)
    debug: bool = _f(False, "log per-layer activation ranges and check every step for NaN/Inf")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N", pattern=r"^(auto|cpu|cuda(:[0-9]+)?|mps)$")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model architecture"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "dataset and loading"})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "optimisation"})


@dataclass(frozen=True)
class PredictDataConfig:
    dataset: str = _f("imagefolder", "an uploaded dataset id, imagefolder (with root) or digits",
                      choices=BUILTIN_DATASETS, pattern=ID_RE)
    root: Union[str, None] = _f(None, "folder of images (dataset: imagefolder); labelled if in class folders")
    subset: Union[int, None] = _f(None, "use only the first N samples", min=1)


@dataclass(frozen=True)
class PredictConfig:
    model: str = _f("", "model reference: name, name:version or name@alias", pattern=MODEL_REF_RE)
    data: PredictDataConfig = field(default_factory=PredictDataConfig, metadata={"help": "images to predict"})
    batch_size: int = _f(256, "images per forward pass", min=1, max=65_536)
    top_k: int = _f(5, "probabilities reported per image", min=1, max=1000)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N", pattern=r"^(auto|cpu|cuda(:[0-9]+)?|mps)$")


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def to_dict(self) -> dict:
        return {"field": self.field, "message": self.message}


class ConfigError(ValueError):
    """A config failed validation; ``errors`` holds one FieldError per bad field."""

    def __init__(self, errors: list[FieldError]):
        self.errors = list(errors)
        super().__init__("invalid config: " + "; ".join(f"{e.field}: {e.message}" for e in self.errors))


# ---------------------------------------------------------------- validation

def _type_args(tp: Any) -> tuple:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _check_value(value: Any, tp: Any, meta: dict, path: str) -> tuple[Any, str | None]:
    """Return (coerced value, error message or None) for one scalar field."""
    allowed = _type_args(tp)
    literals = [a for t in allowed if typing.get_origin(t) is Literal for a in typing.get_args(t)]
    if value is None:
        return (None, None) if type(None) in allowed else (None, "must not be null")
    if isinstance(value, str) and value in literals:
        return value, None
    choices, pattern = meta.get("choices"), meta.get("pattern")
    if str in allowed:
        if not isinstance(value, str):
            return None, f"must be a string, got {type(value).__name__}"
        if choices and value in choices:
            return value, None
        if pattern and re.fullmatch(pattern, value):
            return value, None
        if choices:
            extra = " or an uploaded dataset id" if pattern == ID_RE else ""
            return None, f"unknown value {value!r}; expected one of {', '.join(map(str, choices))}{extra}"
        if pattern:
            return None, f"{value!r} does not match the expected format {pattern}"
        if len(value) > 4096:
            return None, "is longer than 4096 characters"
        return value, None
    if bool in allowed:
        if isinstance(value, bool):
            return value, None
        return None, f"must be true or false, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expect = "an integer" if int in allowed else "a number"
        if literals:
            expect += " or " + " or ".join(repr(x) for x in literals)
        return None, f"must be {expect}, got {value!r}"
    if int in allowed and float not in allowed:
        if isinstance(value, float):
            if not value.is_integer():
                return None, f"must be an integer, got {value!r}"
            value = int(value)
    else:
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            return None, "must be a finite number"
    if choices and value not in choices:
        return None, f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    if "min" in meta and value < meta["min"]:
        return None, f"must be >= {meta['min']}, got {value!r}"
    if "max" in meta and value > meta["max"]:
        return None, f"must be <= {meta['max']}, got {value!r}"
    if "gt" in meta and value <= meta["gt"]:
        return None, f"must be > {meta['gt']}, got {value!r}"
    if "lt" in meta and value >= meta["lt"]:
        return None, f"must be < {meta['lt']}, got {value!r}"
    return value, None


def _build(cls: type, data: Any, prefix: str, errors: list[FieldError]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(FieldError(prefix or "config", f"must be a mapping, got {type(data).__name__}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            errors.append(FieldError(where, f"unknown key; allowed: {', '.join(fields)}"))
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], path, errors)
            continue
        value, err = _check_value(data[name], tp, dict(f.metadata), path)
        if err:
            errors.append(FieldError(path, err))
        else:
            kwargs[name] = value
    if any(e.field.startswith(prefix) for e in errors) and prefix:
        return None
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or k in data})
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        errors.append(FieldError(prefix or "config", str(exc)))
        return None


def _cross_checks(cfg: Any, errors: list[FieldError]) -> None:
    data = cfg.data
    if data.dataset == "imagefolder" and not data.root:
        errors.append(FieldError("data.root", "is required when data.dataset is imagefolder"))
    if data.dataset != "imagefolder" and data.root:
        errors.append(FieldError("data.root", "is only used with data.dataset: imagefolder"))
    if isinstance(cfg, PredictConfig):
        if not cfg.model:
            errors.append(FieldError("model", "is required: a model reference such as digits@production"))
        return
    if cfg.training.scheduler == "onecycle" and cfg.training.warmup_epochs:
        errors.append(FieldError("training.warmup_epochs", "is not used with scheduler: onecycle"))


def parse_config(data: Any, kind: str = "train") -> Any:
    """Validate a plain mapping into a TrainConfig (kind=train) or PredictConfig (kind=predict)."""
    cls = {"train": TrainConfig, "predict": PredictConfig}.get(kind) if kind in JOB_KINDS else None
    if cls is None:
        raise ConfigError([FieldError("kind", f"unknown kind {kind!r}; expected {' or '.join(JOB_KINDS)}")])
    errors: list[FieldError] = []
    cfg = _build(cls, data, "", errors)
    if cfg is not None and not errors:
        _cross_checks(cfg, errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply dotted ``key.sub=value`` overrides (values parsed as YAML) to a plain mapping."""
    out = _deepcopy(data)
    errors = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            errors.append(FieldError(item, "override must look like section.key=value"))
            continue
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                errors.append(FieldError(key, "cannot override inside a non-mapping value"))
                break
        else:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    if errors:
        raise ConfigError(errors)
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def _read_mapping(source: str | Path | dict) -> dict:
    if isinstance(source, dict):
        return source
    text = Path(source).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([FieldError("config", f"is not valid YAML: {exc}")]) from None
    return data if data is not None else {}


def load_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a training config from a YAML path or a mapping, applying dotted overrides."""
    return parse_config(apply_overrides(_read_mapping(source), overrides), "train")


def load_predict_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> PredictConfig:
    """Load a batch-inference config from a YAML path or a mapping."""
    return parse_config(apply_overrides(_read_mapping(source), overrides), "predict")


def to_dict(cfg: Any) -> dict:
    """The config as plain data (what checkpoints and the job store keep)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- JSON Schema

def _scalar_schema(tp: Any, meta: dict) -> dict:
    variants = []
    for t in _type_args(tp):
        if t is type(None):
            variants.append({"type": "null"})
        elif typing.get_origin(t) is Literal:
            variants.append({"enum": list(typing.get_args(t))})
        elif t is bool:
            variants.append({"type": "boolean"})
        elif t in (int, float):
            s: dict = {"type": "integer" if t is int else "number"}
            for key, js in (("min", "minimum"), ("max", "maximum"), ("gt", "exclusiveMinimum"),
                            ("lt", "exclusiveMaximum")):
                if key in meta:
                    s[js] = meta[key]
            if meta.get("choices"):
                s["enum"] = [c for c in meta["choices"] if isinstance(c, int)]
            variants.append(s)
        elif t is str:
            s = {"type": "string"}
            if meta.get("choices") and meta.get("pattern"):
                variants.append({"anyOf": [{"enum": list(meta["choices"])},
                                           {"type": "string", "pattern": meta["pattern"]}]})
                continue
            if meta.get("choices"):
                s["enum"] = list(meta["choices"])
            elif meta.get("pattern"):
                s["pattern"] = meta["pattern"]
            variants.append(s)
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def json_schema(cls: type) -> dict:
    """JSON Schema of a config dataclass, built from the same metadata the validator uses."""
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            s = json_schema(tp)
        else:
            s = _scalar_schema(tp, dict(f.metadata))
            default = f.default
            if default is not dataclasses.MISSING:
                s["default"] = default
        s["description"] = f.metadata.get("help", "")
        props[f.name] = s
    return {"type": "object", "additionalProperties": False, "properties": props}
