"""A sweep's config: a base training config, a search space over its dotted fields, how trials are
drawn (grid or seeded random), the metric that ranks them, and successive halving of weak trials.

``parse_config(data, "sweep")`` validates it (``SweepConfig.field_errors`` holds the rules that span
fields, each drawn trial's config included); ``draw_trials`` gives each trial's values, the same for
the same config; ``trial_config`` is a trial's training config; ``sweep_dict`` the sweep as plain data.
"""

import dataclasses
import itertools
import math
import random
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, Strict
from pydantic.dataclasses import dataclass

from configs.errors import ConfigError, FieldError, short
from configs.fields import f, integer, number
from configs.schema import CLASSES, DataConfig, ModelConfig, TrainConfig, TrainingConfig, _config, parse_config

MAX_TRIALS = 64
SECTIONS = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig}
SWEEPABLE = tuple(f"{section}.{field.name}" for section, cls in SECTIONS.items()
                  for field in dataclasses.fields(cls))
DISTRIBUTIONS = ("values", "uniform", "log_uniform", "int_uniform")
SWEEP_METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss")  # recorded at every epoch

Value = Optional[Union[Annotated[bool, Strict()], Annotated[int, Strict()], number(ge=-1e12, le=1e12),
                       Annotated[str, Strict(), Field(max_length=4096)]]]
Bound = number(ge=-1e9, le=1e9)
Pair = Annotated[list[Bound], Field(min_length=2, max_length=2)]
IntPair = Annotated[list[integer(-10**9, 10**9)], Field(min_length=2, max_length=2)]
SpaceKey = Annotated[str, Strict(), Field(max_length=64, json_schema_extra={"enum": list(SWEEPABLE)})]


@dataclass(frozen=True, config=_config({"minProperties": 1, "maxProperties": 1}))
class Distribution:
    """Where one field's trial values come from: exactly one of the four."""
    values: Annotated[list[Value], Field(min_length=1, max_length=MAX_TRIALS)] = f(
        None, "a list to choose from (grid: every one)")  # absent, never null
    uniform: Pair = f(None, "[low, high]: a float drawn uniformly")
    log_uniform: Pair = f(None, "[low, high], 0 < low: a float drawn uniformly in log space")
    int_uniform: IntPair = f(None, "[low, high]: an integer drawn uniformly, both ends included")

    @property
    def kind(self) -> str | None:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        return given[0] if len(given) == 1 else None


@dataclass(frozen=True, config=_config())
class HalvingConfig:
    """Asynchronous successive halving: at each rung (an epoch), a trial whose metric is in the bottom
    (1 - keep) of what the other trials recorded there (at least two) is stopped."""
    rungs: Annotated[list[integer(1, 10_000)], Field(min_length=1, max_length=16)] = Field(
        description="epochs at which trials are compared, increasing, at most base.training.epochs")
    keep: number(gt=0.0, lt=1.0) = f(0.5, "fraction of trials that go on past a rung")


@dataclass(frozen=True, config=_config())
class SweepConfig:
    """A sweep: trials of ``base`` with fields drawn from ``space``, ranked by ``metric``."""
    space: Annotated[dict[SpaceKey, Distribution], Field(min_length=1, max_length=16)] = Field(
        description="dotted training-config field -> distribution, e.g. {\"training.lr\": {\"log_uniform\": "
                    "[1e-4, 1e-1]}}")
    base: TrainConfig = Field(default_factory=TrainConfig, description="the training config every trial starts from")
    method: Literal["random", "grid"] = f("random", "random (seeded draws) or grid (every combination of values)")
    trials: integer(1, MAX_TRIALS) = f(8, "trials drawn (random); the most combinations a grid may have")
    seed: integer(0, 2**32 - 1) = f(0, "seed of the random draws: the same config draws the same trials")
    metric: Literal[SWEEP_METRICS] = f("val_accuracy", "what ranks trials")
    mode: Literal["max", "min"] = f("max", "max or min: which way the metric is better")
    halving: Optional[HalvingConfig] = f(None, "stop weak trials early at these epochs (successive halving)")

    def field_errors(self) -> list[FieldError]:
        """The rules across fields; when they hold, each drawn trial's config must validate too."""
        errors = [*self._space_errors()]
        if self.base.register is not None:
            errors.append(FieldError("base.register", "a sweep's trials are not registered; register the best "
                                                      "trial with POST /v1/models"))
        if self.halving is not None:
            rungs, epochs = self.halving.rungs, self.base.training.epochs
            if any(b <= a for a, b in zip(rungs, rungs[1:])):
                errors.append(FieldError("halving.rungs", f"must be increasing, got {rungs}"))
            elif rungs[-1] > epochs:
                errors.append(FieldError("halving.rungs", f"rung {rungs[-1]} is past base.training.epochs "
                                                          f"({epochs})"))
        if not errors and self.method == "grid":
            size = math.prod(len(d.values) for d in self.space.values())
            if size > self.trials:
                errors.append(FieldError("trials", f"the grid has {size} combinations, more than trials "
                                                   f"({self.trials}); raise trials (at most {MAX_TRIALS}) or "
                                                   "give fewer values"))
        return errors or self._trial_errors()

    def _space_errors(self):
        for key, dist in self.space.items():
            where = f"space.{key}"
            if key not in SWEEPABLE:
                yield FieldError(where, "is not a training-config field; give section.field with section model, "
                                        "data or training (e.g. training.lr)")
            elif dist.kind is None:
                yield FieldError(where, f"give exactly one of {', '.join(DISTRIBUTIONS)}")
            elif dist.kind != "values" and self.method == "grid":
                yield FieldError(where, f"grid search takes values only, not {dist.kind}")
            elif dist.kind != "values":
                low, high = getattr(dist, dist.kind)
                if low > high or (low == high and dist.kind != "int_uniform"):
                    yield FieldError(f"{where}.{dist.kind}", f"low must be below high, got [{low}, {high}]")
                elif dist.kind == "log_uniform" and low <= 0:
                    yield FieldError(f"{where}.{dist.kind}", f"low must be > 0, got {low}")

    def _trial_errors(self) -> list[FieldError]:
        """Each drawn trial validated as a training config; errors name the sweep's field."""
        found: dict[str, FieldError] = {}
        for i, values in enumerate(draw_trials(self), start=1):
            try:
                parse_config(_trial_mapping(self, values), "train")
            except ConfigError as exc:
                for e in exc.errors:
                    if e.field in values:
                        name, text = f"space.{e.field}", f"{e.message} (trial {i} drew {short(values[e.field])})"
                    else:
                        name, text = f"base.{e.field}", e.message
                    found.setdefault(name, FieldError(name, text))
        return list(found.values())


def _sample(rng: random.Random, dist: Distribution):
    if dist.kind == "values":
        return dist.values[rng.randrange(len(dist.values))]
    low, high = getattr(dist, dist.kind)
    if dist.kind == "int_uniform":
        return rng.randint(low, high)
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if dist.kind == "log_uniform" else rng.uniform(low, high)
    return min(max(float(f"{x:.6g}"), low), high)  # six significant digits: readable, still inside the range


def draw_trials(cfg: SweepConfig) -> list[dict]:
    """Each trial's values ({"training.lr": 0.003, ...}): grid = every combination of ``values`` in order;
    random = ``trials`` draws from random.Random(seed), fields in sorted order (the key order sent is moot)."""
    keys = sorted(cfg.space)
    if cfg.method == "grid":
        return [dict(zip(keys, combo)) for combo in itertools.product(*(cfg.space[k].values for k in keys))]
    rng = random.Random(cfg.seed)
    return [{k: _sample(rng, cfg.space[k]) for k in keys} for _ in range(cfg.trials)]


def _trial_mapping(cfg: SweepConfig, values: dict) -> dict:
    data = dataclasses.asdict(cfg.base)
    data.pop("register", None)
    for key, value in values.items():
        section, name = key.split(".", 1)
        data[section][name] = value
    return data


def trial_config(cfg: SweepConfig, values: dict) -> TrainConfig:
    """A trial's validated training config: the base with ``values`` set."""
    return parse_config(_trial_mapping(cfg, values), "train")


def sweep_dict(cfg: SweepConfig) -> dict:
    """The sweep as plain data (what the job store keeps): each distribution holds only the one it
    gives (never a null that would not parse again)."""
    data = dataclasses.asdict(cfg)
    data["space"] = {key: {k: v for k, v in dist.items() if v is not None} for key, dist in data["space"].items()}
    return data


def trial_values(space: dict, config: dict) -> dict:
    """The values a trial drew, read back from its training config (plain data)."""
    out = {}
    for key in sorted(space):
        section, name = key.split(".", 1)
        out[key] = (config.get(section) or {}).get(name)
    return out


CLASSES["sweep"] = SweepConfig  # parse_config(data, "sweep"); configs/__init__ imports this module
