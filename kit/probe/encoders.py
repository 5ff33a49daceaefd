"""Frozen encoders for the probe family: image paths -> one embedding per image.

    encode = build_encoder(cfg, device)      # a timm backbone, or a VLM's vision tower / language model
    features = encode(paths)                 # float32 [N, D]; the same image gives the same row in any fold
    features = encode(paths, cache)          # timm: the images from kit's decoded-image cache, row i = paths[i]

Nothing here is trained, so the embeddings do not depend on the folds and fusion may use them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kit.config import TrainConfig

Encoder = Callable[..., np.ndarray]  # (paths, cache=None) -> [N, D] float32
TIMM_PREFIXES = ("hf-hub:", "hf_hub:", "timm/")


def is_vlm(cfg: TrainConfig) -> bool:
    """A VLM directory or hub id (org/name); otherwise a timm model name."""
    if cfg.family == "vlm":
        return True
    return Path(cfg.model).expanduser().is_dir() or ("/" in cfg.model and not cfg.model.startswith(TIMM_PREFIXES))


def describe(cfg: TrainConfig) -> str:
    """Everything the embeddings depend on: saved features are reused only while this is unchanged."""
    if is_vlm(cfg):
        keys = {"source": cfg.vlm.probe_source, "min_pixels": cfg.vlm.min_pixels, "max_pixels": cfg.vlm.max_pixels}
        if cfg.vlm.probe_source == "language":
            keys.update(prompt=cfg.vlm.prompt, pooling=cfg.vlm.pooling)
        keys["load_in_4bit"] = cfg.vlm.load_in_4bit
    else:
        keys = {"pretrained": cfg.pretrained, "img_size": cfg.img_size, "mean": cfg.mean, "std": cfg.std}
    return json.dumps({"model": cfg.model, **keys}, sort_keys=True)


def build_encoder(cfg: TrainConfig, device: torch.device) -> Encoder:
    from kit.train.runtime import seed_everything, set_tf32

    seed_everything(cfg.seed)  # a randomly initialised encoder (tests, no weights) is the same one every time
    set_tf32(not cfg.deterministic)  # as kit.infer.predict encodes for kit predict and the bundle
    return _vlm_encoder(cfg, device) if is_vlm(cfg) else _timm_encoder(cfg, device)


def _timm_encoder(cfg: TrainConfig, device: torch.device) -> Encoder:
    from kit.infer.cudnn_warmup import warm_up
    from kit.infer.timm_predict import use_channels_last
    from kit.train.augment import eval_pipeline
    from kit.train.dataset import ImageDataset, make_loader
    from kit.train.loop import Normalizer
    from kit.train.runtime import autocast, default_workers
    from kit.train.timm_model import build_model

    channels_last = use_channels_last(cfg.channels_last, device)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = build_model(cfg, num_classes=0).to(device, memory_format=memory_format).eval()  # pooled features
    normalize = Normalizer(cfg.mean, cfg.std, channels_last).to(device)
    batch = cfg.predict_batch_size or 2 * cfg.batch_size

    @torch.no_grad()
    def encode(paths: list[str], cache: np.ndarray | None = None) -> np.ndarray:
        # the cache holds what eval_pipeline makes of each file, so the features are the same; read from it
        # in this process (no loader workers to compete with the model for a CPU's cores)
        dataset = ImageDataset(paths, None, eval_pipeline(cfg.img_size), cache)
        workers = 0 if cache is not None else default_workers(cfg.workers)
        # on CUDA: the forward's cuDNN kernels for the full and the ragged batch, on threads at once
        size = cfg.img_size
        for rows in {min(batch, len(paths)), len(paths) % batch} - {0}:
            warm_up(model, (rows, 3, size, size), device, cfg.precision, channels_last, backward=False).wait()
        out = []
        for images, _ in make_loader(dataset, batch, False, workers, device):
            with autocast(device, cfg.precision):
                out.append(model(normalize(images.to(device))).float().cpu())
        return torch.cat(out).numpy().astype(np.float32)

    return encode


def _vlm_encoder(cfg: TrainConfig, device: torch.device) -> Encoder:
    from kit.train.runtime import autocast, default_workers
    from kit.vlm.features import encoded_batches
    from kit.vlm.inputs import Prompter, pad_right
    from kit.vlm.model import ClassifierHead, VisionLanguage, load_base

    prompter = Prompter.load(cfg)
    vl = VisionLanguage(load_base(cfg, device, lm_head=False))  # no adapter: the encoder stays as published
    pool = ClassifierHead(vl.hidden_size, 1, cfg.vlm.pooling).pool  # only its pooling rule is used
    batch = cfg.predict_batch_size or 2 * cfg.batch_size

    def embed(images) -> torch.Tensor:
        if cfg.vlm.probe_source == "vision":
            return torch.stack([im.features.float().mean(0) for im in images])
        ids = [prompter.prompt_ids(cfg.vlm.prompt, im.features.shape[0]) for im in images]
        ids, mask = pad_right(ids, prompter.tokenizer.pad_token_id or 0)
        return pool(vl.hidden(ids, mask, images), mask, ids == vl.image_token_id)

    @torch.no_grad()
    def encode(paths: list[str], cache: np.ndarray | None = None) -> np.ndarray:
        del cache  # kit's pixel cache holds timm inputs; the VLM's own processor makes its inputs from the files
        out = []
        keys = np.arange(len(paths))
        for _, images in encoded_batches(vl, prompter, list(paths), keys, batch, default_workers(cfg.workers)):
            with autocast(device, cfg.precision):
                out.append(embed(images).float().cpu())
        return torch.cat(out).numpy().astype(np.float32)

    return encode
