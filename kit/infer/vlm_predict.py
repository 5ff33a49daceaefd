"""Predict with one VLM head-mode fold: the base model (a local folder given at run time), the fold's
LoRA adapter and its linear head, one forward per image.

The model and inputs are kit.vlm's own modules (model, inputs, features), embedded as they are;
`logits` and `predict_logp` below are kit.vlm.head's `logits` and `predict_batches` (kit.vlm.head
imports the training loop, so the bundle cannot embed it). transformers and peft load on first use.

    fold = VlmFold(spec, "models/qwen2.5-vl-3b", {"adapter_model": ..., "adapter_config": ..., "head": ...}, device)
    cache = vision_cache(spec)      # the folds of a run share the frozen tower's outputs
    logp = fold(paths, workers=4, cache=cache)   # [N, C] float32
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from kit.infer.progress import progress
from kit.infer.timm_predict import load_safetensors
from kit.train.runtime import autocast

if TYPE_CHECKING:  # kit.vlm loads transformers' helpers: imported when a VLM member is predicted
    from kit.vlm.features import VisionCache


def logits(cfg, prompter, vl, head, images) -> torch.Tensor:
    ids = [prompter.prompt_ids(cfg.vlm.prompt, im.features.shape[0]) for im in images]
    from kit.vlm.inputs import pad_right

    ids, mask = pad_right(ids, prompter.tokenizer.pad_token_id or 0)
    hidden = vl.hidden(ids, mask, images)
    return head(hidden, mask, ids == vl.image_token_id).float()


@torch.no_grad()
def predict_logp(cfg, prompter, vl, head, batches, device: torch.device, total: int, desc: str) -> np.ndarray:
    vl.train(False)
    head.eval()
    out = []
    for _, images in progress(batches, desc, total=total):
        with autocast(device, cfg.precision):
            out.append(F.log_softmax(logits(cfg, prompter, vl, head, images), dim=-1).cpu())
    return torch.cat(out).numpy().astype(np.float32)


def vision_cache(spec: dict) -> VisionCache:
    """Vision-tower outputs of the images, for the folds of one run to share (up to vlm.vision_cache_gb).

    The tower is frozen and the LoRA adapters are confined to the language model (kit.vlm.model), so
    the tower of every fold is the base model's: fold 0 decodes, patches and encodes each image, and the
    other folds read its outputs, the same numbers. Rows beyond the budget are decoded again per fold.
    """
    from kit.vlm.features import VisionCache

    return VisionCache(int(spec["config"]["vlm"]["vision_cache_gb"] * 2**30))


class VlmFold:
    """One fold's adapter and head on the base model, callable on image paths -> logp [N, C] float32."""

    def __init__(self, spec: dict, base: str, files: dict[str, Path], device: torch.device):
        from kit.config import from_dict
        from kit.vlm.inputs import Prompter
        from kit.vlm.model import ClassifierHead, load_vlm

        self.spec, self.device = spec, device
        self.cfg = from_dict({**spec["config"], "model": str(base)})
        adapter_dir = Path(files["adapter_model"]).parent  # adapter_config.json lies beside it
        self.prompter = Prompter.load(self.cfg)
        self.vl = load_vlm(self.cfg, device, lm_head=False, adapter_dir=adapter_dir, trainable=False)
        head = ClassifierHead(self.vl.hidden_size, self.cfg.num_classes, self.cfg.vlm.pooling)
        head.load_state_dict(load_safetensors(Path(files["head"])))
        self.head = head.to(device)

    def __call__(
        self,
        paths: list[str],
        workers: int = 0,
        batch_size: int | None = None,
        desc: str = "predicting",
        cache: VisionCache | None = None,
    ) -> np.ndarray:
        """`cache`: vision_cache(spec), shared by the folds of one run over the same `paths` (rows by index)."""
        from kit.vlm.features import encoded_batches

        size = batch_size or self.spec["batch_size"]
        batches = encoded_batches(self.vl, self.prompter, list(paths), np.arange(len(paths)), size, workers, cache)
        total = -(-len(paths) // size)
        return predict_logp(self.cfg, self.prompter, self.vl, self.head, batches, self.device, total, desc)
