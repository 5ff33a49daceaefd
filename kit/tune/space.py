"""The search space of `kit tune`: which training-config keys vary, and over what.

    space = load_space(Path("space.yaml"), base)       # or default_space(resolved_base)
    params = space.suggest(trial)                      # {"lr": 0.0021, "rrc_scale": [0.35, 1.0], ...}
    cfg = space.apply(base, params, name="tune-x-t003")

A space file maps config keys (dotted for the vlm section) to a range or a list of choices:

    lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float range, here on a log scale
    epochs: {low: 3, high: 10}                   # an int key gets an int range (step: 2 allowed)
    hflip: [0.0, 0.5]                            # choices
    rrc_scale: [[0.35, 1.0], [0.75, 1.0]]        # a list-valued key's choices are lists
    vlm.lora_r: [8, 16, 32]

Every value is checked as the config checks it (type, then the config's own rules) before any trial
runs; an unknown key, a malformed entry or an impossible value is one error naming the file and key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kit.config import TrainConfig, _apply, _is_instance, _nest, read_yaml, to_dict, validate
from kit.errors import KitError

# Keys that name the run, pick the hardware or only change speed: a search over them tunes nothing.
NOT_RECIPE = {
    "name": "each trial is a run of its own name",
    "family": "tune one family at a time",
    "num_classes": "it is set from the folds",
    "seed": "a seed that wins is noise; compare seeds with kit train --set seed=N",
    "deterministic": "it changes speed, not the recipe",
    "device": "it picks the hardware",
    "workers": "it changes speed, not the recipe",
    "cache": "it changes speed, not the recipe",
    "predict_batch_size": "it changes speed, not the recipe",
    "compile": "it changes speed, not the recipe",
    "cuda_graphs": "it changes speed, not the recipe",
    "channels_last": "it changes speed, not the recipe",
    "pipeline": "it changes speed, not the recipe",
    "gpu_cache_gb": "it changes speed, not the recipe",
}
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Param:
    """One searched key: `choices`, or a range from `low` to `high`."""

    key: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False  # an int key: suggest_int
    listed: bool = False  # a list-valued key: choices travel through Optuna as JSON strings

    def suggest(self, trial) -> Any:
        if self.choices:
            return self._decode(trial.suggest_categorical(self.key, [self._encode(c) for c in self.choices]))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def trial_value(self, value: Any) -> Any | None:
        """`value` as Optuna stores it for this key, or None when the space does not hold it."""
        if self.choices:
            return self._encode(value) if value in self.choices else None
        if not self.low <= value <= self.high:
            return None
        return int(value) if self.integer else float(value)

    def as_yaml(self) -> Any:
        if self.choices:
            return list(self.choices)
        entry = {"low": self.low, "high": self.high}
        if self.log:
            entry["log"] = True
        if self.step is not None:
            entry["step"] = self.step
        return entry

    def _encode(self, value: Any) -> Any:
        return json.dumps(value) if self.listed else value

    def _decode(self, value: Any) -> Any:
        return json.loads(value) if self.listed else value


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    source: str  # the space file, or "default space"

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def suggest(self, trial) -> dict[str, Any]:
        return {p.key: p.suggest(trial) for p in self.params}

    def apply(self, base: TrainConfig, params: dict[str, Any], name: str) -> TrainConfig:
        """The base config with `params` set and the run named `name`."""
        cfg = copy.deepcopy(base)
        problems: list[str] = []
        _apply(cfg, _nest(dict(params)), problems, self.source)
        problems += validate(cfg)
        if problems:
            raise KitError(f"{self.source}: the values {params} make an invalid config: {'; '.join(problems)}")
        cfg.name = name
        return cfg

    def start(self, base: TrainConfig) -> dict[str, Any]:
        """The base config's values as trial parameters (for enqueue_trial), for the keys the space holds."""
        values = {p.key: p.trial_value(_get(base, p.key)) for p in self.params}
        return {k: v for k, v in values.items() if v is not None}

    def max_epochs(self, base: TrainConfig) -> int:
        for p in self.params:
            if p.key == "epochs":
                return int(max(p.choices) if p.choices else p.high)
        return base.epochs

    def as_dict(self) -> dict[str, Any]:
        return {p.key: p.as_yaml() for p in self.params}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)


def load_space(path: Path, base: TrainConfig) -> Space:
    path = Path(path)
    if not path.is_file():
        raise KitError(f"--space {path}: file not found")
    return parse_space(read_yaml(path), str(path), base)


def parse_space(data: dict[str, Any], where: str, base: TrainConfig) -> Space:
    """Check every entry of a space; all problems are reported at once."""
    if not data:
        raise KitError(f"{where}: the space is empty; give at least one key to search")
    problems: list[str] = []
    params = []
    for key, spec in data.items():
        param = _parse_entry(str(key), spec, where, base, problems)
        if param is not None:
            params.append(param)
    if "lr" in data and base.lr_find:
        problems.append(f"{where}: 'lr': the base config has lr_find: true, which sets lr; search one or the other")
    if problems:
        raise KitError("; ".join(problems))
    return Space(tuple(params), where)


def _parse_entry(key: str, spec: Any, where: str, base: TrainConfig, problems: list[str]) -> Param | None:
    hint = _hint(key)
    if hint is None:
        near = difflib.get_close_matches(key, _all_keys(), n=1)
        problems.append(f"{where}: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        return None
    if key in NOT_RECIPE:
        problems.append(f"{where}: {key!r} cannot be searched ({NOT_RECIPE[key]})")
        return None
    if dataclasses.is_dataclass(hint):
        problems.append(f"{where}: {key!r} is a section; search its keys by dotted name, e.g. {key}.lora_r")
        return None
    before = len(problems)
    if isinstance(spec, list) and spec:
        param = _choices(key, hint, spec, where, problems)
    elif isinstance(spec, dict):
        param = _range(key, hint, spec, where, problems)
    else:
        problems.append(f"{where}: {key!r}: expected a list of choices or {{low: .., high: ..}}, got {spec!r}")
        return None
    if len(problems) > before:
        return None
    values = param.choices or (param.low, param.high)
    base_problems = set(validate(base))
    for value in values:  # the config's own rules, at each choice or at both ends of a range
        cfg = copy.deepcopy(base)
        _apply(cfg, _nest({key: value}), [], where)
        for message in validate(cfg):
            if message not in base_problems:
                problems.append(f"{where}: {key}={value!r}: {message}")
    return param


def _choices(key: str, hint: Any, spec: list, where: str, problems: list[str]) -> Param:
    listed = list in (typing.get_origin(h) for h in (hint, *typing.get_args(hint)))  # rrc_scale: a list or auto
    values = [_as_float(v) if hint is float else v for v in spec]
    for value in values:
        if not _is_instance(value, hint):
            shape = " (each choice of a list-valued key is a list, e.g. [[0.35, 1.0], [0.75, 1.0]])" if listed else ""
            problems.append(f"{where}: {key!r}: choice {value!r} is not {_name(hint)}{shape}")
    if len({json.dumps(v) for v in values}) < len(values):
        problems.append(f"{where}: {key!r}: repeated choices in {spec!r}")
    return Param(key, choices=tuple(values), listed=listed)


def _range(key: str, hint: Any, spec: dict, where: str, problems: list[str]) -> Param:
    before = len(problems)
    unknown = set(spec) - RANGE_KEYS
    if unknown:
        problems.append(f"{where}: {key!r}: unknown range field {sorted(unknown)[0]!r} (fields: low, high, log, step)")
        return Param(key)
    if hint == float | str:  # a probability that may also be `auto` (hflip, vflip, rot90): its range is a float's
        hint = float
    if hint not in (int, float):
        problems.append(f"{where}: {key!r} is {_name(hint)}: give a list of choices, not a range")
        return Param(key)
    if "low" not in spec or "high" not in spec:
        problems.append(f"{where}: {key!r}: a range needs low and high")
        return Param(key)
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    number = int if hint is int else float
    for field, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and not _is_instance(_as_float(value) if number is float else value, number):
            problems.append(f"{where}: {key}.{field} must be {number.__name__}, got {value!r}")
    if not isinstance(log, bool):
        problems.append(f"{where}: {key}.log must be true or false, got {log!r}")
    if len(problems) > before or not low < high:
        if len(problems) == before:
            problems.append(f"{where}: {key!r}: low {low} must be below high {high} (one value: fix it with --set)")
        return Param(key)
    if log and (low <= 0 or step is not None):
        problems.append(f"{where}: {key!r}: a log range needs low > 0 and no step")
    if step is not None and step <= 0:
        problems.append(f"{where}: {key}.step must be > 0")
    return Param(
        key,
        low=number(low),
        high=number(high),
        log=log,
        step=None if step is None else number(step),
        integer=number is int,
    )


def default_space(cfg: TrainConfig) -> Space:
    """kit's space around a resolved timm config: every key the issue lists, each holding the base value
    (so the base recipe is a point of the space and trial 0 is the base recipe itself)."""
    if cfg.family != "timm":
        raise KitError(f"kit tune: the default space is the timm family's; give --space for a {cfg.family} run")
    data: dict[str, Any] = {}
    if not cfg.lr_find:
        data["lr"] = {"low": _round(cfg.lr / 10), "high": _round(cfg.lr * 10), "log": True}
    if cfg.epochs >= 2:  # at most the base's epochs: the base config is the budget per trial
        data["epochs"] = {"low": max(1, cfg.epochs // 2), "high": cfg.epochs}
    # [1, 1], no crop: a crop can cut out what the label is about (a crack in a solar cell: session 19)
    data["rrc_scale"] = _with(cfg.rrc_scale, [[0.08, 1.0], [0.35, 1.0], [0.75, 1.0], [1.0, 1.0]])
    data["hflip"] = _with(cfg.hflip, [0.0, 0.5])
    data["vflip"] = _with(cfg.vflip, [0.0, 0.5])
    data["color_jitter"] = _with(cfg.color_jitter, [0.0, 0.5])
    data["mixup"] = _with(cfg.mixup, [0.0, 0.2])
    data["cutmix"] = _with(cfg.cutmix, [0.0, 1.0])
    data["label_smoothing"] = {"low": 0.0, "high": max(0.2, cfg.label_smoothing)}
    data["ema_decay"] = _with(cfg.ema_decay, [0.0, 0.99, 0.999])
    groups, fixed_size = _model_facts(cfg)
    if cfg.img_size and not fixed_size:  # a ViT with a fixed patch grid takes one input size
        data["img_size"] = _with(cfg.img_size, [max(8, round(cfg.img_size * 0.75 / 8) * 8), cfg.img_size])
    if cfg.pretrained and groups > 2:  # freezing random weights only stops them learning
        data["freeze_groups"] = _with(cfg.freeze_groups, [0, groups // 2, groups - 2])
    return parse_space(data, "default space", cfg)


def check_model(space: Space, cfg: TrainConfig) -> None:
    """Values the resolved timm model cannot take: freezing all its groups, another input size for a
    model with a fixed patch grid. Named before any trial runs instead of failing one."""
    if cfg.family != "timm" or "model" in space.keys or {"freeze_groups", "img_size"}.isdisjoint(space.keys):
        return  # a searched model has groups and sizes of its own: left to the trials
    groups, fixed_size = _model_facts(cfg)
    for p in space.params:
        values = p.choices or (p.low, p.high)
        if p.key == "freeze_groups" and max(values) >= groups:
            raise KitError(
                f"{space.source}: freeze_groups={max(values)}: {cfg.model} has {groups} groups; freeze fewer"
            )
        if p.key == "img_size" and fixed_size and set(values) != {cfg.img_size}:
            raise KitError(f"{space.source}: img_size: {cfg.model} takes only {cfg.img_size} px (a fixed patch grid)")


def _model_facts(cfg: TrainConfig) -> tuple[int, bool]:
    """The model's count of coarse parameter groups, and whether it takes only one input size."""
    from timm.models import group_modules

    from kit.train.timm_model import build_model

    model = build_model(cfg, max(cfg.num_classes, 1), pretrained=False)
    groups = len(group_modules(model, model.group_matcher(coarse=True)))
    fixed = bool(getattr(getattr(model, "patch_embed", None), "strict_img_size", False))
    return groups, fixed


def _with(value: Any, choices: list) -> list:
    """`choices` with the base value among them: in order where they compare, else the base last (a flip
    left `auto`, kit's default, among probabilities: its trials run the flips probe, as the base would)."""
    if value in choices:
        return choices
    try:
        return sorted([*choices, value])
    except TypeError:
        return [*choices, value]


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _get(cfg: TrainConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _hint(key: str) -> Any | None:
    owner: Any = TrainConfig
    hint = None
    for part in key.split("."):
        if owner is None or not dataclasses.is_dataclass(owner):
            return None
        hint = typing.get_type_hints(owner).get(part)
        if hint is None:
            return None
        owner = hint if dataclasses.is_dataclass(hint) else None
    return hint


def _all_keys() -> list[str]:
    flat = []
    for key, value in to_dict(TrainConfig()).items():
        flat += [f"{key}.{k}" for k in value] if isinstance(value, dict) else [key]
    return flat
