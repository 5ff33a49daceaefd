"""Predict with one timm fold model: rebuilt from the run's config and its safetensors weights, fed
kit's Pillow preprocessing, flip TTA averaged in probability space.

kit's own predictor (kit.train.timm_family.load_predictor) is this class, and the offline bundle
embeds this file, so both compute the same numbers:

    spec = timm_spec(read_json(run_dir / "config.json"))
    fold = TimmFold(spec, run_dir / "fold0" / "model.safetensors", torch.device("cpu"))
    logp = fold(paths, workers=4)   # [N, C] float32 log-probabilities
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kit.errors import KitError
from kit.infer.cudnn_warmup import warm_up
from kit.infer.graphed_forward import forward
from kit.infer.images import ImageFiles, image_batches
from kit.infer.progress import progress
from kit.train.runtime import autocast_dtype

# The eight symmetries of the square (the dihedral group), each a function of NCHW batches: flips suit
# left-right symmetric photos, the rotations and diagonal flips rotation-invariant data (cells, tissue).
VIEWS = {
    "none": lambda x: x,
    "hflip": lambda x: torch.flip(x, [3]),
    "vflip": lambda x: torch.flip(x, [2]),
    "rot90": lambda x: torch.rot90(x, 1, [2, 3]),
    "rot180": lambda x: torch.rot90(x, 2, [2, 3]),
    "rot270": lambda x: torch.rot90(x, 3, [2, 3]),
    "transpose": lambda x: x.transpose(2, 3),
    "transverse": lambda x: torch.rot90(x, 2, [2, 3]).transpose(2, 3),
}
# where a crop view sits in the square: its top-left corner as a share of the room the crop leaves
CROP_CORNERS = {"tl": (0, 0), "tr": (1, 0), "bl": (0, 1), "br": (1, 1), "c": (0.5, 0.5)}


def crop_views(area: float) -> list[str]:
    """The names of the five crops (four corners and the centre) of `area` of the image, each resized back
    to the whole: what the flips probe scores for `rrc_scale: auto` (kit.train.symmetry), never a TTA view."""
    return [f"crop{area:g}:{corner}" for corner in CROP_CORNERS]


def _view(name: str):
    if name in VIEWS:
        return VIEWS[name]
    area, corner = name.removeprefix("crop").split(":")
    return lambda x: _crop(x, float(area), CROP_CORNERS[corner])


def _crop(x: torch.Tensor, area: float, corner: tuple[float, float]) -> torch.Tensor:
    size = x.shape[-1]
    side = round(size * math.sqrt(area))
    x0, y0 = (round((size - side) * c) for c in corner)
    crop = x[:, :, y0 : y0 + side, x0 : x0 + side]
    return F.interpolate(crop, size=x.shape[-2:], mode="bilinear", align_corners=False)


def timm_spec(config: dict) -> dict:
    """What prediction needs from a run's resolved config (config.json or `to_dict(cfg)`)."""
    return {
        "family": "timm",
        "model": config["model"],
        "num_classes": int(config["num_classes"]),
        "drop_rate": float(config.get("drop_rate", 0.0)),
        "drop_path_rate": float(config.get("drop_path_rate", 0.0)),
        "img_size": int(config["img_size"]),
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        # a run whose `tta: [auto]` is not chosen yet (folds still training) predicts with the plain view
        "tta": ["none"] if config["tta"][:1] == ["auto"] else list(config["tta"]),
        "precision": config.get("precision", "auto"),
        "channels_last": bool(config.get("channels_last", True)),
        "batch_size": int(config.get("predict_batch_size") or 2 * config["batch_size"]),
        "cuda_batch_size": int(config.get("predict_batch_size") or config["batch_size"]),  # prediction_rows
        "deterministic": bool(config.get("deterministic", False)),  # TF32 as in training (runtime.set_tf32)
        "cuda_graphs": config.get("cuda_graphs", "auto"),  # prediction forwards too (kit.infer.graphed_forward)
    }


def use_channels_last(requested: bool, device: torch.device) -> bool:
    """channels_last where it was measured to pay: CUDA (cuDNN's NHWC kernels) and the CPU (oneDNN: on 2
    cores a Lite0 training step 1.3x, its inference 1.5x; ResNet-10t and MobileNetV3 even). MPS untested."""
    return requested and device.type in ("cuda", "cpu")


class Normalizer(torch.nn.Module):
    """uint8 NCHW batches from the loader -> normalised float on the device (channels_last if asked)."""

    def __init__(self, mean: list[float], std: list[float], channels_last: bool):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("inv_std", 1 / (torch.tensor(std).view(1, 3, 1, 1) * 255))
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) * self.inv_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def cast_for_autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """A prediction model's convolution and linear weights cast once to the autocast dtype, in place.

    Autocast casts them at every forward, and a replayed graph (kit.infer.graphed_forward, whose capture
    turns autocast's weight cache off) repeats the ~100 cast kernels of a Lite0 forward at every batch.
    Autocast casts a float32 weight with the same rounding and keeps its layout, and leaves a tensor of
    its dtype as it is, so the forward computes the same numbers, bit for bit: kit's own predictions
    (float32 weights, cast as they go) and the bundle's agree. Batch norms keep their float32 weights, as
    autocast keeps them. Only layers whose forward is torch's own are cast: a subclass may use its weight
    outside autocast's casts (timm's StdConv2d normalises it first). Nothing to do without autocast."""
    if dtype is None:
        return model
    for module in model.modules():
        if type(module).forward in (torch.nn.Conv2d.forward, torch.nn.Linear.forward):
            module.to(dtype)
    return model


def raise_bad_image(extra) -> None:
    """Loaders of ImageFiles yield each image's error ("" when fine) where training loaders yield labels."""
    if isinstance(extra, list | tuple):
        bad = [e for e in extra if e]
        if bad:
            raise KitError(f"{bad[0]}" + (f" ({len(bad)} unusable images in this batch)" if len(bad) > 1 else ""))


# On CUDA cuDNN builds an execution plan per convolution and input shape: about 40 ms each for ordinary
# convolutions, and for bf16 channels_last depthwise ones (cuDNN 9.19 compiles their kernels at run time)
# 2-3 s per new batch size for lite0's forward on an H200 (bench/first_step.py, py-spy of kit train). So a
# prediction batch on CUDA has the training batch's shape (`prediction_rows`), a ragged one padded with blank
# rows (their outputs dropped): the training process predicts with the plans its steps built, and kit's
# predictions during training, kit predict's and the bundle's run the same kernels. Callers that know no
# batch pad to a multiple of PAD_ROWS.
PAD_ROWS = 128


def prediction_rows(spec: dict, device: torch.device) -> int:
    """The rows of a timm member's prediction batches: on CUDA its training batch (or predict_batch_size),
    on the CPU twice that (its `batch_size`: DataLoader workers decode a batch at a time)."""
    if device.type == "cuda":
        return int(spec.get("cuda_batch_size") or spec["batch_size"])
    return int(spec["batch_size"])


def pad_rows(images: torch.Tensor, rows: int) -> torch.Tensor:
    """A batch with blank rows appended up to `rows` (the caller drops their outputs)."""
    if len(images) >= rows:
        return images
    return torch.cat([images, images.new_zeros((rows - len(images), *images.shape[1:]))])


@torch.no_grad()
def tta_logp(
    model: torch.nn.Module,
    images: torch.Tensor,
    normalize: Normalizer,
    tta: list[str],
    precision: str,
    rows: int | None = None,
    graphs: bool | str = "auto",
) -> torch.Tensor:
    """Log-probabilities [B, C] float32 of one uint8 NCHW batch already on the device, the views in `tta`
    averaged in probability space. The one place a timm model turns pixels into predictions. On CUDA a
    ragged batch is padded to `rows` (the loader's batch), or else to a multiple of PAD_ROWS, and a
    launch-bound forward is replayed from a CUDA graph (`graphs`: kit.infer.graphed_forward)."""
    n = len(images)
    if images.is_cuda:  # one shape for every batch: cuDNN plans it once
        images = pad_rows(images, rows if rows and rows >= n else -(-n // PAD_ROWS) * PAD_ROWS)
    x = normalize(images)
    layout = torch.channels_last if normalize.channels_last else torch.contiguous_format
    probs = 0
    for name in tta:
        logits = forward(model, _view(name)(x), precision, layout, graphs)
        probs = probs + torch.softmax(logits.float(), dim=-1)
    return (probs[:n] / len(tta)).clamp_min(1e-15).log()


@torch.no_grad()
def predict_logp(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    normalize: Normalizer,
    tta: list[str],
    precision: str,
    desc: str = "predicting",
    graphs: bool | str = "auto",
) -> np.ndarray:
    """Log-probabilities [N, C] of a loader's batches (see tta_logp; ragged ones padded to its batch size)."""
    model.eval()
    out, rows = [], getattr(loader, "batch_size", None)
    for images, extra in progress(loader, desc):
        raise_bad_image(extra)
        x = images.to(device, non_blocking=True)
        out.append(tta_logp(model, x, normalize, tta, precision, rows, graphs).cpu())
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def predict_view_logp(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    normalize: Normalizer,
    views: list[str],
    precision: str,
    desc: str = "predicting",
    graphs: bool | str = "auto",
) -> np.ndarray:
    """Each view's own log-probabilities [V, N, C], each batch decoded once: what kit's `tta: auto`
    chooses from (an average of some of them in probability space is what `tta_logp` computes)."""
    model.eval()
    out, rows = [], getattr(loader, "batch_size", None)
    for images, extra in progress(loader, desc):
        raise_bad_image(extra)
        x = images.to(device, non_blocking=True)
        logp = [tta_logp(model, x, normalize, [view], precision, rows, graphs) for view in views]
        out.append(torch.stack(logp).cpu())
    return torch.cat(out, dim=1).numpy().astype(np.float32)


def build_timm_model(spec: dict) -> torch.nn.Module:
    """The architecture with a `num_classes` head and no pretrained download (fold weights follow)."""
    import timm

    try:
        return timm.create_model(
            spec["model"],
            pretrained=False,
            num_classes=spec["num_classes"],
            drop_rate=spec["drop_rate"],
            drop_path_rate=spec["drop_path_rate"],
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            version = timm.__version__
            raise KitError(f"model {spec['model']!r}: not a timm model (timm {version} here)") from None
        raise


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


class TimmFold:
    """One fold's model on `device`, callable on image paths -> log-probabilities [N, C] float32.

    `template`: an unloaded `build_timm_model(spec)` to copy instead of building the architecture
    again: the folds of a run share it, and a copy costs a fraction of timm's weight initialisation.
    """

    def __init__(self, spec: dict, weights: Path, device: torch.device, template: torch.nn.Module | None = None):
        self.spec, self.device = spec, device
        model = build_timm_model(spec) if template is None else copy.deepcopy(template)
        try:
            model.load_state_dict(load_safetensors(Path(weights)))
        except RuntimeError as e:  # another timm version may name or shape the layers differently
            import timm

            reason = (str(e).splitlines() or [""])[0][:160]
            raise KitError(f"{weights}: does not fit timm {timm.__version__}'s {spec['model']} ({reason})") from None
        channels_last = use_channels_last(spec["channels_last"], device)
        # eval once here: the decode-once path feeds batches to `logp` directly, with no predict_logp around it
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        model = model.eval().to(device, memory_format=memory_format)
        self.model = cast_for_autocast(model, autocast_dtype(device, spec["precision"]))
        self.normalize = Normalizer(spec["mean"], spec["std"], channels_last).to(device)
        # on CUDA: the forward's cuDNN kernels, on many threads at once (a process's first fold only)
        size = spec["img_size"]
        warm_up(self.model, (self.batch_size, 3, size, size), device, spec["precision"], channels_last, False).wait()

    @property
    def batch_size(self) -> int:
        """Its prediction batch: the spec's, on CUDA as every kit prediction shapes it (prediction_rows)."""
        return prediction_rows(self.spec, self.device)

    def logp(self, images: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, C] float32, on the device, of a uint8 NCHW batch already there (on CUDA a
        batch of fewer rows than its prediction batch is padded to it, as kit's own predictions were)."""
        spec = self.spec
        graphs = spec.get("cuda_graphs", "auto")
        return tta_logp(self.model, images, self.normalize, spec["tta"], spec["precision"], self.batch_size, graphs)

    def __call__(
        self,
        paths: list[str],
        workers: int = 0,
        batch_size: int | None = None,
        cache: np.ndarray | None = None,
        cache_rows: np.ndarray | None = None,
        desc: str = "predicting",
    ) -> np.ndarray:
        dataset = ImageFiles(paths, self.spec["img_size"], cache, cache_rows)
        loader = image_batches(dataset, batch_size or self.batch_size, workers, self.device)
        spec, graphs = self.spec, self.spec.get("cuda_graphs", "auto")
        tta, precision = spec["tta"], spec["precision"]
        return predict_logp(self.model, loader, self.device, self.normalize, tta, precision, desc, graphs)

    def views(
        self,
        paths: list[str],
        views: list[str],
        workers: int = 0,
        cache: np.ndarray | None = None,
        cache_rows: np.ndarray | None = None,
        desc: str = "predicting",
    ) -> np.ndarray:
        """[V, N, C] float32: the log-probabilities of each of `views` on its own (predict_view_logp)."""
        dataset = ImageFiles(paths, self.spec["img_size"], cache, cache_rows)
        loader = image_batches(dataset, self.batch_size, workers, self.device)
        precision, graphs = self.spec["precision"], self.spec.get("cuda_graphs", "auto")
        return predict_view_logp(self.model, loader, self.device, self.normalize, views, precision, desc, graphs)
