"""Tiny random Qwen2.5-VL and LLaVA models with their processors, built from configs alone.

No weights are downloaded: tests and `kit demo` use these to check the whole vlm pipeline on a CPU
in seconds. Each is a few hundred thousand parameters and saves with `save_pretrained`, so the rest
of the kit loads it exactly like a real checkpoint directory:

    path = build_tiny_qwen2_5_vl(Path("models/tiny-qwen2.5-vl"))
    path = build_tiny_llava(Path("models/tiny-llava"))
    cfg = load_config(None, [f"model={path}", *TINY_VLM_SETTINGS])   # a run that takes seconds on a CPU
"""

from __future__ import annotations

from pathlib import Path

import torch

# Byte-level vocabulary with no merges: every string tokenises, one token per byte, so class names
# of any script work and no tokenizer training is needed.
_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_LLAVA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
_ENDS = ("<|endoftext|>", "<|im_end|>")

# Config overrides that keep a run on the tiny models to seconds: 4 image tokens, rank-4 LoRA, 1 epoch.
TINY_VLM_SETTINGS = [
    "family=vlm",
    "vlm.min_pixels=3136",  # 56x56: 16 patches -> 4 image tokens per image (LLaVA: its fixed 28 px)
    "vlm.max_pixels=3136",
    "vlm.lora_r=4",
    "vlm.lora_alpha=8",
    "epochs=1",
    "batch_size=4",
    "lr=0.001",
    "warmup_epochs=0",
]

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ image_placeholder }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials: list[str]):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    # as in Qwen2.5-VL-Instruct: a turn ends with <|im_end|>, padding is <|endoftext|>
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in _ENDS]})
    return tokenizer


def _template(placeholder: str) -> str:
    return _CHAT_TEMPLATE.replace("{{ image_placeholder }}", placeholder)


def _text_config(tokenizer, eos: str) -> dict:
    # head_dim 16 -> mrope_section must sum to 8 (Qwen2.5-VL splits the rotary half into t/h/w)
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids(eos),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": True,
    }


def build_tiny_qwen2_5_vl(out_dir: Path, seed: int = 0, pixels: int = 56 * 56) -> Path:
    """A 2-layer Qwen2.5-VL; images are capped at `pixels` (56x56: 16 patches -> 4 image tokens)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _tokenizer(_QWEN_SPECIALS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, "<|im_end|>"),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,  # must equal the text hidden size
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels),
        video_processor=Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels),
        tokenizer=tokenizer,
        chat_template=_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return _save(model, processor, out_dir)


def build_tiny_llava(out_dir: Path, seed: int = 0, image_size: int = 28) -> Path:
    """A 2-layer LLaVA (CLIP vision tower + Qwen2 language model) on fixed `image_size` images."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _tokenizer(_LLAVA_SPECIALS)
    text = _text_config(tokenizer, "<|im_end|>")
    text = {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_parameters")}
    patches = (image_size // 14) ** 2
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 14,
            "projection_dim": 32,
        },
        text_config={"model_type": "qwen2", **text},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        vision_feature_layer=-1,
        image_seq_length=patches,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    size = {"height": image_size, "width": image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token the tower adds and the projector drops
        chat_template=_template("<image>"),
    )
    return _save(model, processor, out_dir)


def _save(model, processor, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
