"""Images and prompts to model inputs, kept apart so each image is encoded once.

The image side (decode, pixel cap, the processor's patching) depends only on the image; the text side
(chat template, image placeholder expanded to the image's token count, tokenisation) only on the
prompt and that count. So vision-tower outputs can be cached per image and any prompt built later:

    prompter = Prompter.load(cfg)
    loader = image_loader(prompter, paths, rows, batch_size=8, workers=2)   # pixel batches
    ids = prompter.prompt_ids(cfg.vlm.prompt, n_image_tokens=64)            # token ids with the image slots
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kit.config import TrainConfig
from kit.errors import KitError
from kit.images import load_image


def is_grid_model(model_type: str) -> bool:
    """Qwen-VL models patch images at their own aspect ratio, within a pixel budget (min/max pixels)."""
    return "qwen" in model_type


@dataclass
class Prompter:
    processor: object
    grid: bool  # Qwen-style dynamic resolution; else a fixed square input (LLaVA)
    image_size: int  # the fixed input side of non-grid models (0 for grid models)
    _ids: dict = field(default_factory=dict)  # (text, n_image_tokens) -> ids: a prompt is tokenised once

    @classmethod
    def load(cls, cfg: TrainConfig) -> Prompter:
        from transformers import AutoConfig, AutoProcessor

        remote = cfg.vlm.trust_remote_code
        try:
            config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=remote)
            grid = is_grid_model(config.model_type)
            # min_pixels/max_pixels, not size={shortest_edge, longest_edge}: a hub processor config that has
            # min_pixels/max_pixels keys (Qwen2.5-VL's do) overrides a `size` argument (transformers 5.24)
            caps = {"min_pixels": cfg.vlm.min_pixels, "max_pixels": cfg.vlm.max_pixels} if grid else {}
            processor = AutoProcessor.from_pretrained(cfg.model, trust_remote_code=remote, **caps)
        except (OSError, ValueError) as e:
            raise KitError(f"model {cfg.model!r}: cannot load its processor ({str(e).splitlines()[0][:160]})") from None
        size = 0 if grid else int(getattr(config.vision_config, "image_size", 0) or cfg.img_size)
        return cls(processor, grid, size)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return int(self.processor.image_token_id)

    def chat_text(self, prompt: str) -> str:
        """The user turn (one image, then the prompt) and the start of the assistant's answer."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"{self.processor.image_token}\n{prompt}\n"  # base models without a chat template

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        key = (prompt, n_image_tokens)
        if key not in self._ids:
            token = self.processor.image_token
            text = self.chat_text(prompt).replace(token, token * n_image_tokens, 1)
            self._ids[key] = list(self.tokenizer(text)["input_ids"])
        return self._ids[key]

    def answer_ids(self, text: str, end: bool = True) -> list[int]:
        """Tokens of an answer; the end-of-turn token makes 'cat' and 'cat (tabby)' distinct answers."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        return [*ids, int(eos)] if end and eos is not None else ids

    def prepare(self, image: Image.Image) -> Image.Image:
        # Fixed-size towers: squash the whole image to the tower's square (as the timm pipeline does)
        # instead of the processor's centre crop, which would cut off the edges of wide photos.
        if not self.grid and self.image_size:
            return image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return image

    def pixels(self, image: Image.Image) -> dict[str, torch.Tensor]:
        out = self.processor.image_processor(images=[self.prepare(image)], return_tensors="pt")
        keep = ("pixel_values", "image_grid_thw") if self.grid else ("pixel_values",)
        return {k: out[k] for k in keep}


class PixelDataset(Dataset):
    """Row i -> (row id, processor pixels); rows in `skip` (already cached) yield no pixels.

    Pixels are cast to `dtype` in the worker: the vision tower casts them to its own dtype first thing,
    so casting earlier is the same arithmetic and halves what a bf16 tower's batch sends to the device."""

    def __init__(
        self,
        prompter: Prompter,
        paths: list[str],
        rows: np.ndarray,
        skip: set[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.prompter, self.paths, self.rows, self.skip = prompter, list(paths), np.asarray(rows), skip or set()
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        if row in self.skip:
            return row, None
        path = self.paths[i]
        try:
            image = load_image(path)
        except (OSError, ValueError) as e:
            raise KitError(f"{path}: cannot decode image ({e})") from None
        pixels = self.prompter.pixels(image)
        pixels["pixel_values"] = pixels["pixel_values"].to(self.dtype)
        return row, pixels


def collate_pixels(items: list) -> tuple[list[int], dict[str, torch.Tensor] | None, list[int]]:
    """(rows, one pixel batch for the rows that need encoding, their positions in `rows`)."""
    rows = [row for row, _ in items]
    todo = [i for i, (_, px) in enumerate(items) if px is not None]
    if not todo:
        return rows, None, []
    first = items[todo[0]][1]
    batch = {key: torch.cat([items[i][1][key] for i in todo]) for key in first}
    return rows, batch, todo


def image_loader(
    prompter: Prompter,
    paths: list[str],
    rows: np.ndarray,
    batch_size: int,
    workers: int,
    skip: set[int] | None = None,
    dtype: torch.dtype = torch.float32,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches in the given row order; decoding and patching run in `workers` processes; `pin_memory`
    (for a CUDA tower) lets each batch travel to the device asynchronously."""
    return DataLoader(
        PixelDataset(prompter, paths, rows, skip, dtype),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_pixels,
        persistent_workers=False,
        pin_memory=pin_memory,
    )


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: positions and the causal mask of real tokens stay those of an unpadded run."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def check_model_path(model: str) -> None:
    """A local directory must exist; anything else is taken for a hub id (fails offline with a clear line)."""
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise KitError(f"model {model!r}: no such directory")
