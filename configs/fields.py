"""The field vocabulary of job configs: strict scalar types (Pydantic) with their bounds, and the
fixed lists of model and dataset names. Every number has a minimum and a maximum, so the JSON
Schema documents a range for each; no float may be NaN or infinite.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, Strict

from configs.names import DEVICE_RE, ID_RE, MODEL_REF_RE

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
MAX_PATH = 4096

Auto = Literal["auto"]
Bool = Annotated[bool, Strict()]


def _model_name(value: str) -> str:
    if value not in MODEL_NAMES:
        raise ValueError(f"unknown model {value[:64]!r}; expected one of {', '.join(MODEL_NAMES)}")
    return value


# a name from the fixed registry (direct construction, e.g. ModelConfig(name=...), says "unknown model")
ModelName = Annotated[str, Strict(), Field(json_schema_extra={"enum": list(MODEL_NAMES)}), AfterValidator(_model_name)]
# a built-in dataset, or an uploaded one's id. Pydantic matches patterns with Rust's regex, whose "$" is the
# very end, so an id with a trailing newline is refused (tests/unit/test_configs.py checks it)
Dataset = Literal[BUILTIN_DATASETS] | Annotated[str, Strict(), Field(pattern=ID_RE)]
ModelRef = Annotated[str, Strict(), Field(pattern=MODEL_REF_RE, max_length=140)]  # name, name:3, name@alias
Device = Annotated[str, Strict(), Field(pattern=DEVICE_RE, max_length=16)]
# a local path: checked against the operator's data roots at submit and again by the worker
LocalPath = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_PATH, pattern=r"^[^\x00]+$")]


def integer(ge: int, le: int) -> Any:
    """A strict integer (no bools, no floats) in [ge, le]."""
    return Annotated[int, Strict(), Field(ge=ge, le=le)]


def number(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A strict, finite number (ints accepted, bools refused) within the given bounds."""
    return Annotated[float, Strict(), Field(ge=ge, gt=gt, le=le, lt=lt, allow_inf_nan=False)]


def one_of(*values: int) -> Any:
    """A strict integer that is one of ``values``."""
    def check(value: int) -> int:
        if value not in values:
            raise ValueError(f"must be one of {', '.join(map(str, values))}, got {value}")
        return value

    return Annotated[int, Strict(), Field(ge=min(values), le=max(values), json_schema_extra={"enum": list(values)}),
                     AfterValidator(check)]


def f(default: Any, help: str) -> Any:
    """A field with its default and its help text (the JSON Schema's description)."""
    return Field(default, description=help)
