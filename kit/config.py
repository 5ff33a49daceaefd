"""Training configs: one dataclass, YAML presets shipped with kit, `key=value` overrides.

    cfg = load_config("efficientnet_lite0", overrides=["epochs=3", "lr=1e-3"])
    cfg = load_config("my.yaml", quick={"model": "resnet18", "img_size": 64})

Unknown keys and values of the wrong type are errors naming the key; every problem is collected and
reported at once. The resolved config is written to runs/<run>/config.json and rebuilds the model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kit.errors import KitError

PRESETS_DIR = Path(__file__).parent / "presets"
CROP_DEFAULT = (0.75, 1.0)  # the crops of an rrc_scale left `auto` where no probe resolves it (kit bench)


@dataclass
class VLMConfig:
    """Settings of the `vlm` family (a LoRA-tuned vision-language model)."""

    head: str = "head"  # head: linear head on hidden state | rerank: re-score a base run's top-k | probe
    prompt: str = "What is shown in this image? Answer with the class name."
    pooling: str = "last"  # hidden state fed to the head: last token | mean of the image tokens
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    load_in_4bit: bool = False  # nf4 + double quantisation through bitsandbytes (QLoRA)
    gradient_checkpointing: bool = True
    min_pixels: int = 64 * 28 * 28  # Qwen2.5-VL image budget; LLaVA uses img_size
    max_pixels: int = 256 * 28 * 28
    base_run: str = ""  # rerank: the run whose top-k candidates are re-scored
    top_k: int = 5
    trust_remote_code: bool = False
    rerank_score: str = "label"  # rerank: label (class-name log-likelihood, prompt run once) | letter (option letter)
    head_lr_scale: float = 10.0  # head mode: the fresh linear head learns at lr x this (LoRA at lr)
    vision_cache_gb: float = 8.0  # RAM for frozen vision-tower outputs reused across epochs; 0 off
    probe_source: str = "vision"  # probe on a VLM: vision (mean of projected image tokens) | language (LM hidden)
    probe_c: float = 0.0  # probe: inverse L2 strength of the logistic regression; 0: chosen by inner CV


@dataclass
class TrainConfig:
    """Everything that defines a run. Names match the CLI's --set keys."""

    name: str = ""  # run folder under runs/; default derived from the model
    family: str = "timm"  # timm | vlm | probe
    model: str = "resnet18"  # a timm model name, or a local path / hub id for vlm
    pretrained: str = ""  # "" random init | hub | package:efficientnet_lite0 (1, 2) | path to .safetensors/.pth
    num_classes: int = 0  # set from the folds
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    freeze_groups: int = 0  # freeze the first N of timm's coarse groups (stem, then stages): weights and BN stats
    # data
    img_size: int = 0  # 0: the model's own input size
    mean: list[float] = field(default_factory=list)  # empty: the model's own
    std: list[float] = field(default_factory=list)
    # RandomResizedCrop area range ([1, 1]: no crop), or auto: the flips probe finds out which crops keep the
    # labels (kit.train.symmetry): a crop to 35% of the area cuts digits apart, one to 75% can cut a cell's crack out
    rrc_scale: list[float] | str = "auto"
    # flip probabilities, or auto: a short probe run decides from the data (kit.train.symmetry)
    hflip: float | str = "auto"
    vflip: float | str = "auto"
    rot90: float | str = "auto"  # a random quarter turn (1, 2 or 3)
    color_jitter: float = 0.0  # probability of a brightness/contrast/saturation jitter
    coarse_dropout: float = 0.0  # probability of cutting out random rectangles
    cache: bool = True  # decoded images resized once into a uint8 memory map shared by folds and runs
    workers: int = -1  # DataLoader workers; -1: one per core, at most 8
    pipeline: str = "auto"  # auto (device on CUDA with the cache) | device (batched on the GPU) | workers
    gpu_cache_gb: float = -1.0  # device pipeline: image cache in GPU memory up to this size; -1: a quarter of it
    # folds trained side by side on each GPU (processes); 0: auto, as many as a small model leaves the GPU idle for
    folds_per_gpu: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    lr: float | str = "auto"  # auto: 3e-3 for a timm model trained from scratch, else 1e-3 (presets set theirs)
    lr_find: bool = False  # before training, an lr range test on fold 0's training rows sets lr (config.json keeps it)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha; 0 off
    cutmix: float = 0.0  # cutmix alpha; 0 off
    ema_decay: float = 0.0  # 0 off; else e.g. 0.999 and predictions use the EMA weights
    grad_accum: int = 1
    clip_grad: float = 0.0
    patience: int = 0  # early stopping on validation log loss; 0 off (it watches the fold's own OOF rows)
    epoch_choice: str = "last"  # last: the schedule's final weights (honest OOF) | best: lowest valid loss (optimistic)
    # runtime
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True  # on CUDA and the CPU (kit.infer.timm_predict.use_channels_last)
    # cuDNN timing its algorithms per conv shape: ~30 s of the first epoch for lite0@224 on an H200, and no
    # faster steps after it (2,979 img/s without, about 2,650 with): off unless a model shows it pays
    cudnn_benchmark: bool = False
    compile: bool | str = "auto"  # auto: on CUDA, compiled after epoch 1 when its time says compiling pays
    # CUDA training steps' forward + backward replayed from a captured graph; auto: when a timed step shows
    # it launch-bound (kit.train.cuda_graph); not with --ddp, grad_accum > 1 or a compiled model
    cuda_graphs: bool | str = "auto"
    seed: int = 42
    deterministic: bool = False  # bit-identical CPU runs (resume tests); slower
    # prediction
    # views of TTA_VIEWS averaged at prediction; [auto]: the views that lower the OOF log loss, chosen
    # cross-fitted at the end of the run (kit.train.tta_choice) among all eight, or among those listed after it
    tta: list[str] = field(default_factory=lambda: ["auto"])
    predict_batch_size: int = 0  # 0: batch_size on CUDA (its cuDNN plans), 2 x batch_size on the CPU
    vlm: VLMConfig = field(default_factory=VLMConfig)


# Test-time views (kit.infer.timm_predict.VIEWS; listed here so config checks import no torch).
TTA_VIEWS = ("none", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse")

# What runs/<run>/config.json records beside the config itself; dropped when it is read back as a config.
RUN_RECORD_KEYS = ("folds_sha256", "classes", "kit_version", "tta_requested")

# Changing these does not change what a run computes, so a resumed run may use other values.
# compile: the same recipe either way (bf16-level differences), so a run may resume on another machine
RESUME_SAFE_KEYS = {
    *("workers", "device", "cache", "predict_batch_size", "name"),
    *("gpu_cache_gb", "compile", "cudnn_benchmark", "folds_per_gpu", "cuda_graphs"),
}


def _is_instance(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (list, typing.List):  # noqa: UP006
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, h) for h in typing.get_args(hint))
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _coerce(value: Any, hint: Any) -> Any:
    """Strings from --set become the field's type: '1e-3' -> 0.001, 'true' -> True, 'a,b' -> [a, b]."""
    if _takes_float(hint) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)  # YAML's `lr: 1` is a float field's 1.0
    if not isinstance(value, str) or hint is str:
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint):
        try:
            return float(value)  # `hflip=0.5`, `lr=1e-3` (which YAML reads as a string); else `auto`
        except ValueError:
            return value
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return [_coerce(v.strip(), item) for v in value.strip("[]").split(",") if v.strip()]
    try:
        if hint is float:
            return float(value)
        if hint is int:
            return int(value)
    except ValueError:
        return value
    parsed = yaml.safe_load(value)
    return parsed if parsed is not None else value


def _takes_float(hint: Any) -> bool:
    return hint is float or (
        typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint)
    )


def _apply(obj: Any, values: dict[str, Any], problems: list[str], where: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(hints))
            problems.append(f"{where}: unknown key {dotted!r} (known: {known})")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{where}: {dotted!r} must be a mapping")
            else:
                _apply(getattr(obj, key), value, problems, where, f"{dotted}.")
            continue
        value = _coerce(value, hint)
        if not _is_instance(value, hint):
            problems.append(f"{where}: {dotted!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")
            continue
        setattr(obj, key, value)


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[key] = value
    return {k: _nest(v) if isinstance(v, dict) and any("." in x for x in v) else v for k, v in nested.items()}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KitError(f"--set {pair!r}: expected key=value")
        result[key.strip()] = value
    return _nest(result)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise KitError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise KitError(f"{path}: expected a mapping of config keys")
    return data


def resolve_source(preset_or_path: str | None) -> tuple[dict[str, Any], str]:
    if not preset_or_path:
        return {}, "defaults"
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise KitError(f"{path}: config file not found")
        data = read_yaml(path)  # YAML is a superset of JSON, so a run's config.json reads here too
        return {k: v for k, v in data.items() if k not in RUN_RECORD_KEYS}, str(path)
    preset = PRESETS_DIR / f"{preset_or_path}.yaml"
    if not preset.is_file():
        raise KitError(f"{preset_or_path}: no such preset (presets: {', '.join(list_presets())}) or config file")
    data = read_yaml(preset)
    data.setdefault("name", preset_or_path)
    return data, f"preset {preset_or_path}"


def load_config(
    preset_or_path: str | None = None,
    overrides: list[str] | None = None,
    quick: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults < preset or YAML file < quick flags < --set overrides; all problems raised at once."""
    cfg = TrainConfig()
    problems: list[str] = []
    data, where = resolve_source(preset_or_path)
    _apply(cfg, data, problems, where)
    flags = {k: v for k, v in (quick or {}).items() if v is not None}
    _apply(cfg, _nest(flags), problems, "flags")
    _apply(cfg, parse_overrides(overrides or []), problems, "--set")
    # each problem names its source; a check of the combined config names every source used
    sources = " + ".join([where] + ["flags"] * bool(flags) + ["--set"] * bool(overrides))
    problems += [f"{sources}: {p}" for p in validate(cfg)]
    if problems:
        raise KitError("; ".join(problems))
    if cfg.lr == "auto":
        cfg.lr = default_lr(cfg)
    if not cfg.name:
        cfg.name = default_run_name(cfg)
    return cfg


def default_lr(cfg: TrainConfig) -> float:
    """AdamW's peak rate when none is given: a from-scratch timm model learns far faster at 3e-3 (rendered
    digits, bench/RESULTS.md); pretrained weights and LoRA adapters keep the gentler 1e-3."""
    return 3e-3 if cfg.family == "timm" and not cfg.pretrained else 1e-3


def default_run_name(cfg: TrainConfig) -> str:
    model = Path(cfg.model).name if cfg.family != "timm" else cfg.model
    size = f"_{cfg.img_size}" if cfg.img_size else ""
    suffix = f"_{cfg.vlm.head}" if cfg.family == "vlm" else ""
    return f"{model.replace('/', '_')}{size}{suffix}"


def validate(cfg: TrainConfig) -> list[str]:
    checks = [
        (cfg.family in ("timm", "vlm", "probe"), f"family {cfg.family!r} must be timm, vlm or probe"),
        (cfg.epochs >= 1, "epochs must be >= 1"),
        (cfg.img_size >= 0, "img_size must be >= 0 (0: the model's own)"),
        (
            all(_probability(p, auto=True) for p in (cfg.hflip, cfg.vflip, cfg.rot90))
            and all(_probability(p) for p in (cfg.color_jitter, cfg.coarse_dropout)),
            "hflip, vflip, rot90 (each also auto), color_jitter and coarse_dropout are probabilities in [0, 1]",
        ),
        (
            cfg.mixup >= 0 and cfg.cutmix >= 0 and 0 <= cfg.label_smoothing < 1,
            "mixup/cutmix >= 0, label_smoothing in [0, 1)",
        ),
        (cfg.batch_size >= 1, "batch_size must be >= 1"),
        (cfg.lr == "auto" or (not isinstance(cfg.lr, str) and cfg.lr > 0), "lr must be > 0 (or auto)"),
        (not cfg.lr_find or cfg.family == "timm", "lr_find: the lr range test is for the timm family"),
        (cfg.grad_accum >= 1, "grad_accum must be >= 1"),
        (0 <= cfg.ema_decay < 1, "ema_decay must be in [0, 1)"),
        (cfg.precision in ("auto", "bf16", "fp32"), "precision must be auto, bf16 or fp32"),
        (cfg.pipeline in ("auto", "device", "workers"), "pipeline must be auto, device or workers"),
        (cfg.folds_per_gpu >= 0, "folds_per_gpu must be >= 0 (0: auto)"),
        (cfg.compile in (True, False, "auto"), "compile must be true, false or auto"),
        (cfg.cuda_graphs in (True, False, "auto"), "cuda_graphs must be true, false or auto"),
        (
            _tta_ok(cfg.tta),
            f"tta items: {', '.join(TTA_VIEWS)}; or auto, optionally followed by the views it may choose",
        ),
        (cfg.epoch_choice in ("last", "best"), "epoch_choice must be last or best"),
        (_crop_ok(cfg.rrc_scale), "rrc_scale: [min, max] in (0, 1], or auto"),
        (len(cfg.mean) in (0, 3) and len(cfg.std) in (0, 3), "mean and std: three values or none"),
        (cfg.vlm.head in ("head", "rerank", "probe"), "vlm.head must be head, rerank or probe"),
        (cfg.vlm.pooling in ("last", "mean"), "vlm.pooling must be last or mean"),
        (cfg.vlm.head != "rerank" or cfg.family != "vlm" or bool(cfg.vlm.base_run), "vlm rerank needs vlm.base_run"),
        (cfg.vlm.rerank_score in ("label", "letter"), "vlm.rerank_score must be label or letter"),
        (cfg.vlm.top_k >= 2, "vlm.top_k must be >= 2"),
        (cfg.vlm.rerank_score != "letter" or cfg.vlm.top_k <= 26, "vlm.top_k must be <= 26 with letter scoring"),
        (cfg.vlm.lora_r >= 1 and 0 <= cfg.vlm.lora_dropout < 1, "vlm.lora_r >= 1 and vlm.lora_dropout in [0, 1)"),
        (0 < cfg.vlm.min_pixels <= cfg.vlm.max_pixels, "vlm.min_pixels must be > 0 and <= vlm.max_pixels"),
        (cfg.vlm.head_lr_scale > 0 and cfg.vlm.vision_cache_gb >= 0, "vlm.head_lr_scale > 0, vlm.vision_cache_gb >= 0"),
        (cfg.vlm.probe_source in ("vision", "language"), "vlm.probe_source must be vision or language"),
        (cfg.vlm.probe_c >= 0, "vlm.probe_c must be >= 0 (0: chosen by inner CV)"),
    ]
    return [message for ok, message in checks if not ok]


def _crop_ok(scale: list[float] | str) -> bool:
    return scale == "auto" or (isinstance(scale, list) and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1)


def crop_scale(cfg: TrainConfig) -> tuple[float, float]:
    """The crop's area range; an unresolved `auto` (kit bench, which runs no probe) crops as the default."""
    return CROP_DEFAULT if cfg.rrc_scale == "auto" else (float(cfg.rrc_scale[0]), float(cfg.rrc_scale[1]))


def _probability(value: float | str, auto: bool = False) -> bool:
    return (auto and value == "auto") or (not isinstance(value, str) and 0 <= value <= 1)


def _tta_ok(tta: list[str]) -> bool:
    views = tta[1:] if tta[:1] == ["auto"] else tta
    return (bool(views) or tta == ["auto"]) and all(t in TTA_VIEWS for t in views) and len(set(views)) == len(views)


def tta_candidates(tta: list[str]) -> list[str] | None:
    """The views `tta: [auto, ...]` chooses among (none always one of them); None for a fixed list."""
    if tta[:1] != ["auto"]:
        return None
    listed = set(tta[1:]) or set(TTA_VIEWS)
    return [v for v in TTA_VIEWS if v in listed or v == "none"]


def cautions(cfg: TrainConfig) -> list[str]:
    """Settings that run but bend the honesty of the OOF score; `kit train` prints them as warnings."""
    notes = []
    if cfg.patience:
        notes.append(
            f"patience={cfg.patience}: early stopping decides on the fold's own validation rows, which become its "
            "OOF rows, so the CV is a little optimistic"
            + ("; it also cuts the cosine schedule before its end" if cfg.epoch_choice == "last" else "")
        )
    if cfg.epoch_choice == "best":
        notes.append("epoch_choice=best: each fold keeps the epoch its own OOF rows liked best; the CV is optimistic")
    return notes


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from runs/<run>/config.json (strict: unknown keys are errors)."""
    cfg = TrainConfig()
    problems: list[str] = []
    _apply(cfg, data, problems, "config.json")
    if problems:
        raise KitError("; ".join(problems))
    return cfg


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ, ignoring those that do not change what a run computes."""
    changed = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_SAFE_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed
