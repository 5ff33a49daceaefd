"""A Hugging Face VLM as a frozen image encoder plus a LoRA-tuned language model.

    vl = load_vlm(cfg, device, lm_head=False)     # base model (+4-bit) with a fresh LoRA adapter
    images = vl.encode_images(pixel_batch)        # frozen tower, no_grad: cache these per image
    hidden = vl.hidden(ids, mask, images)         # language model over prompt + image tokens [B, L, H]

The vision tower and projector never join the autograd graph: they run under `torch.no_grad()`, stay
in eval mode, get no LoRA (adapters are restricted to the language model by a regex) and keep no
input-grad hooks (gradient checkpointing and peft add those; they are removed again).
"""

from __future__ import annotations

import inspect
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kit.config import TrainConfig
from kit.errors import KitError

VISION_MODULES = ("visual", "vision_tower", "vision_model", "multi_modal_projector")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class EncodedImage:
    features: torch.Tensor  # [tokens, hidden]: the projector's output, what replaces the image placeholders
    grid: torch.Tensor | None  # [3] (t, h, w) patch grid of Qwen-style models, for their 3D positions


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" and cfg.precision != "fp32" else torch.float32


def _quantization(cfg: TrainConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    # The vision tower, projector and LM head stay unquantized: they are small, frozen, and the tower's
    # odd inner sizes (3420 in Qwen2.5-VL) miss bitsandbytes' fast kernels. Both the plain names and
    # the anchored regex forms are given: transformers versions match skip patterns differently.
    skip = [*VISION_MODULES, *(f".*{m}" for m in VISION_MODULES), "lm_head"]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )


def load_base(cfg: TrainConfig, device: torch.device, lm_head: bool) -> nn.Module:
    """The pretrained model, frozen; `lm_head=False` leaves the vocabulary projection unloaded."""
    from transformers import AutoModel, AutoModelForImageTextToText

    dtype = compute_dtype(cfg, device)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.vlm.trust_remote_code, "device_map": {"": str(device)}}
    if cfg.vlm.load_in_4bit:
        kwargs["quantization_config"] = _quantization(cfg, dtype)
    auto = AutoModelForImageTextToText if lm_head else AutoModel
    try:
        model = auto.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError) as e:
        raise KitError(f"model {cfg.model!r}: cannot load ({str(e).splitlines()[0][:200]})") from None
    except ImportError as e:  # 4-bit without bitsandbytes, or a model needing a missing package
        raise KitError(f"model {cfg.model!r}: a package is missing ({str(e).splitlines()[0][:200]})") from None
    model.requires_grad_(False)
    if cfg.vlm.load_in_4bit:
        _prepare_kbit(model, dtype)
    return model.eval()


def _prepare_kbit(model: nn.Module, dtype: torch.dtype) -> None:
    """peft's k-bit preparation (frozen, norms in fp32) of the language model only.

    prepare_model_for_kbit_training casts every unquantized tensor it is given to fp32. Given the whole
    model, that is the vision tower, projector, embeddings and LM head too: ~7 GB more at 7B, for frozen
    parts that run under autocast anyway. So it gets the language model, and the embeddings go back to
    the compute dtype; checkpointing is set up separately (enable_checkpointing).
    """
    from peft import prepare_model_for_kbit_training

    lm = model.get_submodule(language_model_name(model))
    prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    if dtype != torch.float32:
        lm.get_input_embeddings().to(dtype)


def language_model_name(model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "language_model"]
    if not names:
        raise KitError(f"{type(model).__name__}: no `language_model` module; not a supported VLM architecture")
    return min(names, key=len)


def lora_config(cfg: TrainConfig, model: nn.Module):
    from peft import LoraConfig

    # A regex (full match) confines the adapters to the language model: the vision blocks of some
    # models have modules of the same names, and the tower must stay frozen to be cacheable.
    prefix = re.escape(language_model_name(model))
    targets = "|".join(re.escape(t) for t in cfg.vlm.target_modules)
    return LoraConfig(
        r=cfg.vlm.lora_r,
        lora_alpha=cfg.vlm.lora_alpha,
        lora_dropout=cfg.vlm.lora_dropout,
        target_modules=rf"(.*\.)?{prefix}\..*\.({targets})",
        bias="none",
    )


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing of the language model's layers only, with no input-grad hooks.

    Non-reentrant checkpointing needs no grad-requiring inputs, so the hooks transformers and peft add
    (which would also hit the vision patch embedding) are removed again.
    """
    lm = model.get_submodule(language_model_name(model))
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in model.modules():
        if hasattr(module, "disable_input_require_grads"):
            module.disable_input_require_grads()


def load_vlm(
    cfg: TrainConfig, device: torch.device, lm_head: bool, adapter_dir: Path | None = None, trainable: bool = True
) -> VisionLanguage:
    """Base model with a fresh LoRA adapter, or the one saved in `adapter_dir`."""
    from peft import PeftModel, get_peft_model

    base = load_base(cfg, device, lm_head)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    else:
        with warnings.catch_warnings():  # peft reads a property transformers 5.2x deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base, lora_config(cfg, base))
    if trainable and cfg.vlm.gradient_checkpointing:
        enable_checkpointing(model)
    return VisionLanguage(model)


def save_adapter(model: nn.Module, fold_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors, each renamed into place (a reader never sees half)."""
    fold_dir = Path(fold_dir)
    with tempfile.TemporaryDirectory(dir=fold_dir, prefix=".adapter.") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        umask = os.umask(0)
        os.umask(umask)
        for name in ADAPTER_FILES:
            os.chmod(Path(tmp) / name, 0o666 & ~umask)  # safetensors writes 0600 files; artifacts are shared
            os.replace(Path(tmp) / name, fold_dir / name)


def _core(model: nn.Module) -> nn.Module:
    """The inner XModel holding `language_model` and `get_image_features` (under peft and any LM head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "get_image_features") and hasattr(inner, "language_model"):
        return inner
    if hasattr(base, "get_image_features") and hasattr(base, "language_model"):
        return base
    raise KitError(f"{type(base).__name__}: no get_image_features/language_model; not a supported VLM")


class VisionLanguage:
    """The pieces of a VLM the kit calls directly, so images and prompts can be fed separately.

    Not an nn.Module on purpose: it only points into `model`, so nothing is registered twice.
    """

    def __init__(self, model: nn.Module):
        self.model = model  # the PeftModel: parameters, adapter saving
        self.core = _core(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.lm_head = base.get_output_embeddings() if hasattr(base, "lm_head") else None
        self.config = self.core.config
        self.language_model = self.core.language_model
        self.vision = [m for n, m in self.core.named_children() if n in VISION_MODULES]
        self.image_token_id = int(self.config.image_token_id)
        self.grid = hasattr(self.core, "get_rope_index")
        # transformers 5.2x wants the modality of each token for the 3D positions, earlier versions do not
        rope_args = inspect.signature(self.core.get_rope_index).parameters if self.grid else {}
        self._token_types = "mm_token_type_ids" in rope_args
        cache_arg = "cache" if "cache" in inspect.signature(self.language_model.forward).parameters else None
        self._cache_arg = cache_arg or "past_key_values"

    @property
    def hidden_size(self) -> int:
        return int(self.language_model.get_input_embeddings().weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    def train(self, mode: bool = True) -> VisionLanguage:
        self.model.train(mode)
        for module in self.vision:  # frozen tower: dropout and norms always in inference mode
            module.eval()
        return self

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def encode_images(self, pixels: dict[str, torch.Tensor]) -> list[EncodedImage]:
        """One EncodedImage per image of the batch; never part of the autograd graph."""
        for module in self.vision:
            module.eval()
        pixel_values = pixels["pixel_values"].to(self.device)
        grid = pixels.get("image_grid_thw")
        if grid is not None:
            out = self.core.get_image_features(pixel_values, grid.to(self.device))
        else:
            kwargs = {
                k: getattr(self.config, k)
                for k in ("vision_feature_layer", "vision_feature_select_strategy")
                if hasattr(self.config, k)
            }
            out = self.core.get_image_features(pixel_values=pixel_values, **kwargs)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, torch.Tensor):  # older versions: one tensor, images concatenated or stacked
            sizes = (grid.prod(-1) // self.core.visual.spatial_merge_size**2).tolist() if grid is not None else None
            feats = torch.split(feats, sizes) if feats.ndim == 2 and sizes else list(feats)
        grids = list(grid) if grid is not None else [None] * len(feats)
        return [EncodedImage(f.detach(), g) for f, g in zip(feats, grids, strict=True)]

    def embed(
        self, ids: torch.Tensor, mask: torch.Tensor, images: list[EncodedImage]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the image features in the placeholder slots, and position ids."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.language_model.get_input_embeddings()(ids)
        features = torch.cat([im.features for im in images]).to(self.device, embeds.dtype)
        slots = (ids == self.image_token_id).unsqueeze(-1)
        if int(slots.sum()) != features.shape[0]:
            raise KitError(f"prompt has {int(slots.sum())} image slots for {features.shape[0]} image tokens")
        embeds = embeds.masked_scatter(slots, features)
        return embeds, self.positions(ids, mask, images)

    def positions(self, ids: torch.Tensor, mask: torch.Tensor, images: list[EncodedImage]) -> torch.Tensor | None:
        """Qwen's 3D (t, h, w) rotary positions; None lets other models count 0, 1, 2, ..."""
        if not self.grid:
            return None
        grid = torch.stack([im.grid for im in images]).to(self.device)
        kwargs = {"image_grid_thw": grid, "attention_mask": mask}
        if self._token_types:
            kwargs["mm_token_type_ids"] = (ids == self.image_token_id).int()
        position_ids, _ = self.core.get_rope_index(ids, **kwargs)
        return position_ids

    def run(self, embeds, mask, position_ids, cache=None, use_cache: bool = False):
        """The language model's last hidden states [B, L, H] and, with use_cache, its KV cache."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=use_cache, **kwargs
        )
        # read the output field under this version's name: the other name warns of deprecation in 5.2x
        return out.last_hidden_state, getattr(out, self._cache_arg) if use_cache else None

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, images: list[EncodedImage]) -> torch.Tensor:
        embeds, position_ids = self.embed(ids, mask, images)
        return self.run(embeds, mask.to(self.device), position_ids)[0]


class ClassifierHead(nn.Module):
    """Linear head on one pooled hidden state per sequence: the last real token, or the image tokens' mean."""

    def __init__(self, hidden_size: int, num_classes: int, pooling: str):
        super().__init__()
        self.pooling = pooling
        self.fc = nn.Linear(hidden_size, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # near-uniform first predictions: loss starts at ~log(C)
        nn.init.zeros_(self.fc.bias)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor, image_slots: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            weights = image_slots.to(hidden.device, torch.float32).unsqueeze(-1)
            return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1)
        last = mask.to(hidden.device).sum(1) - 1  # right padding: the last real token
        return hidden[torch.arange(len(hidden), device=hidden.device), last].float()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, image_slots: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(hidden, mask, image_slots))
