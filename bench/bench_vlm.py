"""GPU benchmark of the vlm family (head mode) against the usual transformers + peft loop, in one process.

    python bench/bench_vlm.py --arch 3b --mode lora qlora --batch 1 8 --out vlm-3b.json   # ~5 min on an H100
    python bench/bench_vlm.py --arch 7b --mode lora --batch 1 8 --out vlm-7b-lora.json      # one call per mode
    python bench/bench_vlm.py --arch 7b --mode qlora --batch 1 8 --out vlm-7b-qlora.json
    python bench/bench_vlm.py --arch tiny --mode lora --batch 2 --steps 2 --warmup 1 --device cpu   # CPU check

The models are Qwen2.5-VL-3B / 7B built from their published configs with random weights (no download),
saved once as a local checkpoint (bf16 safetensors + a synthetic processor) under --work, so that kit
loads them through its own path (`kit.vlm.head.build`: AutoModel, 4-bit with its quantization config)
and the reference through the usual `from_pretrained`. The processor is built from nothing: a byte-level
tokenizer whose special tokens have Qwen2.5-VL's ids, Qwen's image processor, and a chat template; the
default prompt makes the sequence 290 tokens (256 image tokens), the length the real Qwen2.5-VL-Instruct
template gives kit's default prompt. Images are 448x448 JPEGs (grid [1, 32, 32], 256 image tokens).

Per (arch, mode), kit first, then the reference, one model on the device at a time:
  kit      kit's real loop: LoraTrainer.train_epoch over encoded_batches (DataLoader workers decode the
           JPEGs, the frozen tower runs under no_grad, features go to kit's VisionCache) with the head-mode
           loss. `train-cold`: first epoch (cache empty, the tower runs); `train-warm`: the next epoch over
           the same images (cache warm: kit's steady state). Then larger batches (doubling up to
           --max-batch) until one runs out of memory. `infer`: kit's predict_batches over fresh images
           (no cache: decode + tower + language model), batch --infer-batch.
  ref      the usual loop: AutoModelForImageTextToText + peft LoRA (r=16, alpha 32, dropout 0.05 on
           q,k,v,o), `gradient_checkpointing_enable()` + `enable_input_require_grads()` (QLoRA:
           BitsAndBytesConfig nf4 + double quant + `prepare_model_for_kbit_training`), a linear 396-class
           head on the last token's hidden state, AdamW, bf16 autocast, the full forward each step (vision
           tower included) on processor outputs kept on the device. `--ref usual nograd` adds the variant
           whose vision tower runs without gradient (non-reentrant checkpointing, input-grad hooks removed).
Timings: the device is synchronised around each timed region; the first --warmup batches are not timed.
Peak memory is torch.cuda.max_memory_allocated over the timed region (weights included). A configuration
that runs out of memory is recorded as OOM and the sweep goes on. Every row is printed when measured and
--out (JSON) is rewritten after each row.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # kit's epoch bars: one printed row per measurement instead
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after the tokenizer ran

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing kit

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations of the installed transformers
warnings.filterwarnings("ignore", message=".*use_reentrant parameter should be passed.*")  # peft's usual loop

NUM_CLASSES = 396
DEFAULT_PROMPT = "What is this?"  # byte-level tokens: 290 in all, as the real template with kit's prompt
SPECIALS = [  # Qwen2.5-VL's added tokens, in id order from 151643
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
FIRST_SPECIAL_ID = 151643
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL-3B/7B-Instruct config.json (ENVIRONMENT.md); "tiny" keeps their shape rules at CPU size.
_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "hidden_act": "silu",
    "in_channels": 3,
}
ARCHS = {
    "3b": {
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
        },
        "vision": dict(_VISION, out_hidden_size=2048),
        "tie": True,
        "mrope": [16, 24, 24],
    },
    "7b": {
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
        },
        "vision": dict(_VISION, out_hidden_size=3584),
        "tie": False,
        "mrope": [16, 24, 24],
    },
    "tiny": {  # the dimensions of kit.vlm.tiny, with the real vision windowing and token ids
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
        },
        "vision": dict(_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
        "tie": True,
        "mrope": [2, 3, 3],
    },
}
for _arch in ARCHS.values():
    _arch["vision"]["out_hidden_size"] = _arch["text"]["hidden_size"]


# ----------------------------------------------------------------------------------------------------------------
# The random checkpoint and the images


def _tokenizer():
    """Byte-level BPE with no merges; Qwen2.5-VL's special tokens at their real ids."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)})  # never produced
    vocab.update({s: FIRST_SPECIAL_ID + i for i, s in enumerate(SPECIALS)})
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [s for s in SPECIALS if s not in tokenizer.all_special_tokens]}
    )
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    return tokenizer


def _config(arch: str):
    from transformers import Qwen2_5_VLConfig

    spec = ARCHS[arch]
    ids = {s: FIRST_SPECIAL_ID + i for i, s in enumerate(SPECIALS)}
    text = {
        **spec["text"],
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128000,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "rope_scaling": {"type": "mrope", "mrope_section": spec["mrope"]},
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": spec["mrope"]},
        "tie_word_embeddings": spec["tie"],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(spec["vision"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=spec["tie"],
    )


def build_checkpoint(arch: str, folder: Path, device: torch.device, pixels: int) -> tuple[Path, dict]:
    """Random weights from the published config, saved with a synthetic processor; reused when present."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    marker = folder / "bench_checkpoint.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("arch") == arch and info.get("dtype") == str(dtype) and info.get("pixels") == pixels:
            return folder, {**info, "reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(_config(arch), dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    built = time.perf_counter() - start
    model.save_pretrained(folder)
    del model
    free_memory()
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels),
        video_processor=Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels),
        tokenizer=_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    info = {
        "arch": arch,
        "dtype": str(dtype),
        "pixels": pixels,
        "params_b": round(params / 1e9, 3),
        "vision_params_b": round(vision / 1e9, 3),
        "build_s": round(built, 1),
        "save_s": round(time.perf_counter() - start - built, 1),
    }
    marker.write_text(json.dumps(info))
    return folder, {**info, "reused": False}


def write_images(folder: Path, n: int, size: int) -> list[str]:
    """Photo-like JPEGs (smooth colour fields + noise), written once."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.is_file():
            base = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            noisy = np.asarray(base, dtype=np.int16) + rng.integers(-20, 20, (size, size, 3))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Timing, memory, results


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


class Clock:
    """Starts when the (warmup+1)-th item is requested from the wrapped iterator: the warm-up batches,
    including their loading and encoding, stay out of the timed region."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.start: float | None = None
        self.items = 0

    def wrap(self, source: Iterable, count: Callable[[object], int]) -> Iterator:
        it = iter(source)
        for i in range(1 << 62):
            if i == self.warmup:
                sync(self.device)
                reset_peak(self.device)
                self.start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            if i >= self.warmup:
                self.items += count(item)
            yield item

    def rate(self) -> tuple[float, float]:
        """(items/s, seconds) of the timed region; call after the loop."""
        sync(self.device)
        if self.start is None or not self.items:
            raise RuntimeError("nothing was timed: more batches than --warmup are needed")
        seconds = time.perf_counter() - self.start
        return self.items / seconds, seconds


class Results:
    COLUMNS = ("arch", "mode", "loop", "phase", "batch", "images_per_s", "peak_gib", "seconds", "note")

    def __init__(self, out: Path | None, meta: dict):
        self.out, self.meta, self.rows = out, meta, []
        print(" | ".join(f"{c:>12}" for c in self.COLUMNS), flush=True)

    def add(self, **row) -> dict:
        row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items() if v is not None}
        self.rows.append(row)
        print(" | ".join(f"{self._cell(row.get(c, '')):>12}" for c in self.COLUMNS), flush=True)
        self.write()
        return row

    @staticmethod
    def _cell(value) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    def write(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows, "summary": self.summary()}, indent=1))
        tmp.replace(self.out)

    def summary(self) -> list[dict]:
        """kit / ref image rates for each (arch, mode, phase, batch) measured by both."""

        def rate(row):
            return row.get("images_per_s") if isinstance(row.get("images_per_s"), float) else None

        out = []
        kit_rows = [r for r in self.rows if r.get("loop") == "kit" and rate(r)]
        for ref in (r for r in self.rows if str(r.get("loop", "")).startswith("ref") and rate(r)):
            for kit in kit_rows:
                same = all(kit.get(k) == ref.get(k) for k in ("arch", "mode", "batch"))
                phases = {"train": ("train-warm", "train-cold"), "infer": ("infer",)}.get(ref.get("phase"), ())
                if same and kit.get("phase") in phases:
                    out.append(
                        {
                            "arch": ref["arch"],
                            "mode": ref["mode"],
                            "batch": ref["batch"],
                            "kit": kit["phase"],
                            "ref": ref["loop"],
                            "kit_images_per_s": rate(kit),
                            "ref_images_per_s": rate(ref),
                            "ratio": round(rate(kit) / rate(ref), 2),
                        }
                    )
        return out


# ----------------------------------------------------------------------------------------------------------------
# kit


def kit_config(model_dir: Path, mode: str, batch: int, args):
    from kit.config import load_config

    overrides = [
        f"model={model_dir}",
        "family=vlm",
        "vlm.head=head",
        f"batch_size={batch}",
        f"predict_batch_size={args.infer_batch}",
        f"vlm.load_in_4bit={'true' if mode == 'qlora' else 'false'}",
        f"vlm.min_pixels={args.image_size**2}",
        f"vlm.max_pixels={args.image_size**2}",
        f"vlm.prompt={args.prompt}",
        f"device={args.device}",
        f"workers={args.workers}",
        "lr=1e-4",
        "warmup_epochs=0",
        "epochs=100",
        *args.set,
    ]
    cfg = load_config(None, overrides)
    cfg.num_classes = NUM_CLASSES
    return cfg


def run_kit(arch: str, mode: str, model_dir: Path, paths: list[str], args, results: Results, device) -> None:
    from kit.vlm import head as head_mode
    from kit.vlm.features import VisionCache, encoded_batches
    from kit.vlm.trainer import LoraTrainer

    base = {"arch": arch, "mode": mode, "loop": "kit"}
    batches = sorted(set(args.batch))
    cfg = kit_config(model_dir, mode, max(batches), args)
    workers = cfg.workers if cfg.workers >= 0 else min(8, len(os.sched_getaffinity(0)))
    reset_peak(device)
    start = time.perf_counter()
    prompter, vl, head = head_mode.build(cfg, device)  # kit's own loading path (4-bit included)
    seq_len = len(prompter.prompt_ids(cfg.vlm.prompt, (args.image_size // 28) ** 2))
    results.add(
        **base,
        phase="load",
        seconds=round(time.perf_counter() - start, 1),
        peak_gib=peak_gib(device),
        note=f"seq_len={seq_len} workers={workers} ckpt={cfg.vlm.gradient_checkpointing}",
    )
    trainer = LoraTrainer(cfg, vl, head, device, steps_per_epoch=args.steps)
    cache = VisionCache(int(cfg.vlm.vision_cache_gb * 2**30))
    labels = torch.randint(0, NUM_CLASSES, (len(paths),), generator=torch.Generator().manual_seed(0))
    loss_fn = head_mode.train_loss(cfg, prompter, vl, head, labels, device)
    next_row = 0

    def epoch(rows: np.ndarray, batch: int) -> tuple[float, float, float | None]:
        clock = Clock(device, args.warmup)
        source = encoded_batches(vl, prompter, [paths[r] for r in rows], rows, batch, workers, cache)
        trainer.train_epoch(clock.wrap(source, lambda b: len(b[0])), loss_fn, math.ceil(len(rows) / batch), "bench")
        rate, seconds = clock.rate()
        return rate, seconds, peak_gib(device)

    def train(batch: int, fresh: bool) -> float | None:
        """Cold epoch (first sight of the images) then warm epoch (cached tower outputs); warm img/s."""
        nonlocal next_row
        n = (args.warmup + args.steps) * batch
        if fresh:
            rows, next_row = np.arange(next_row, next_row + n), next_row + n
        else:  # larger batches: images partly seen already, so only the warm epoch is a clean figure
            rows = np.arange(n)
        try:
            rate, seconds, peak = epoch(rows, batch)
            if fresh:
                results.add(**base, phase="train-cold", batch=batch, images_per_s=rate, peak_gib=peak, seconds=seconds)
            rate, seconds, peak = epoch(rows, batch)
            results.add(**base, phase="train-warm", batch=batch, images_per_s=rate, peak_gib=peak, seconds=seconds)
            return rate
        except Exception as e:  # an OOM is a result; anything else is re-raised
            if not is_oom(e):
                raise
            trainer.optimizer.zero_grad(set_to_none=True)
            free_memory()
            results.add(**base, phase="train", batch=batch, note="OOM")
            return None

    rates = {}
    for batch in batches:
        rates[batch] = train(batch, fresh=True)
    batch = max(batches) * 2
    while batch <= args.max_batch and rates.get(batch // 2) and not over_budget(args):
        rates[batch] = train(batch, fresh=False)
        batch *= 2
    fitted = {b: r for b, r in rates.items() if r}
    if fitted:
        best = max(fitted, key=fitted.get)
        results.add(**base, phase="best-train", batch=best, images_per_s=fitted[best], note=f"tried {sorted(rates)}")

    # Inference as kit's predictors run it: the fold's saved adapter and head loaded for inference
    # (LoRA merged into the weights unless 4-bit), the training model freed first.
    fold_dir = args.work / "run" / "fold0"
    fold_dir.mkdir(parents=True, exist_ok=True)
    head_mode.save(vl, head, fold_dir)
    trainer = loss_fn = vl = head = None  # the training model goes before the predictor loads
    free_memory()
    prompter, vl, head = head_mode.build(cfg, device, fold_dir, trainable=False)
    ib = args.infer_batch
    rows = np.arange((args.warmup + args.steps) * ib) % len(paths)
    try:
        reset_peak(device)
        clock = Clock(device, args.warmup)
        source = encoded_batches(vl, prompter, [paths[r] for r in rows], rows, ib, workers)  # no cache, as predict
        head_mode.predict_batches(cfg, prompter, vl, head, clock.wrap(source, lambda b: len(b[0])), device)
        rate, seconds = clock.rate()
        results.add(**base, phase="infer", batch=ib, images_per_s=rate, peak_gib=peak_gib(device), seconds=seconds)
    except Exception as e:
        if not is_oom(e):
            raise
        free_memory()
        results.add(**base, phase="infer", batch=ib, note="OOM")
    if args.loader:
        from kit.vlm.inputs import image_loader

        clock = Clock(torch.device("cpu"), 1)
        for _ in clock.wrap(image_loader(prompter, [paths[r] for r in rows], rows, ib, workers), lambda b: len(b[0])):
            pass
        rate, seconds = clock.rate()
        results.add(
            **base, phase="decode-only", batch=ib, images_per_s=rate, seconds=seconds, note=f"{workers} workers"
        )


# ----------------------------------------------------------------------------------------------------------------
# The usual transformers + peft loop


def ref_model(model_dir: Path, mode: str, variant: str, device: torch.device, lora_r: int):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype, "device_map": {"": str(device)}}
    if mode == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
    usual = variant == "usual"
    gc_kwargs = None if usual else {"use_reentrant": False}
    if mode == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kwargs
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if usual:
            model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora_r,
            lora_alpha=2 * lora_r,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            bias="none",
        ),
    )
    if not usual:  # the vision tower then builds no graph: nothing before the language model needs grad
        for module in model.modules():
            if hasattr(module, "disable_input_require_grads"):
                module.disable_input_require_grads()
    hidden = model.get_base_model().config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, NUM_CLASSES).to(device)
    return model, head


def ref_inputs(processor, model, image, batch: int, prompt: str, device: torch.device) -> dict:
    """What the processor makes of `batch` copies of one image and the prompt, on the device."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(text=[text] * batch, images=[image] * batch, return_tensors="pt"))
    params = inspect.signature(model.get_base_model().forward).parameters
    if "mm_token_type_ids" in params and "mm_token_type_ids" not in inputs:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == processor.image_token_id).int()
    inputs = {k: v.to(device) for k, v in inputs.items() if k in params}
    if "logits_to_keep" in params:  # the head reads hidden states; skip the full-vocabulary logits
        inputs["logits_to_keep"] = 1
    return inputs


def run_ref(arch: str, mode: str, variant: str, model_dir: Path, image_path: str, args, results, device) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    from kit.train.runtime import autocast

    base = {"arch": arch, "mode": mode, "loop": f"ref-{variant}"}
    reset_peak(device)
    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir, min_pixels=args.image_size**2, max_pixels=args.image_size**2)
    model, head = ref_model(model_dir, mode, variant, device, args.lora_r)
    results.add(**base, phase="load", seconds=round(time.perf_counter() - start, 1), peak_gib=peak_gib(device))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    image = Image.open(image_path).convert("RGB")

    def forward(inputs: dict) -> torch.Tensor:
        out = model(**inputs, output_hidden_states=True, use_cache=False)
        return head(out.hidden_states[-1][:, -1].float())

    for batch in sorted(set(args.batch)):
        try:
            inputs = ref_inputs(processor, model, image, batch, args.prompt, device)
            labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
            model.train()
            clock = Clock(device, args.warmup)
            for _ in clock.wrap(range(args.warmup + args.steps), lambda _, b=batch: b):
                with autocast(device, "auto"):
                    loss = F.cross_entropy(forward(inputs), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            rate, seconds = clock.rate()
            results.add(
                **base, phase="train", batch=batch, images_per_s=rate, peak_gib=peak_gib(device), seconds=seconds
            )
        except Exception as e:
            if not is_oom(e):
                raise
            optimizer.zero_grad(set_to_none=True)
            inputs = loss = None
            free_memory()
            results.add(**base, phase="train", batch=batch, note="OOM")
    inputs = loss = None
    optimizer.zero_grad(set_to_none=True)
    free_memory()
    if variant == "usual" or args.ref_infer_all:  # inference is the same for both variants
        try:
            inputs = ref_inputs(processor, model, image, args.infer_batch, args.prompt, device)
            model.eval()
            clock = Clock(device, args.warmup)
            with torch.no_grad():
                for _ in clock.wrap(range(args.warmup + args.steps), lambda _: args.infer_batch):
                    with autocast(device, "auto"):
                        F.log_softmax(forward(inputs), dim=-1).cpu()
            rate, seconds = clock.rate()
            results.add(
                **base,
                phase="infer",
                batch=args.infer_batch,
                images_per_s=rate,
                peak_gib=peak_gib(device),
                seconds=seconds,
            )
        except Exception as e:
            if not is_oom(e):
                raise
            free_memory()
            results.add(**base, phase="infer", batch=args.infer_batch, note="OOM")


# ----------------------------------------------------------------------------------------------------------------


_START = time.perf_counter()


def over_budget(args) -> bool:
    return bool(args.budget_s) and time.perf_counter() - _START > args.budget_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS), default=["3b"])
    parser.add_argument("--mode", nargs="+", choices=["lora", "qlora"], default=["lora"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--max-batch", type=int, default=None, help="kit: double the batch up to this (CUDA: 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before each measurement")
    parser.add_argument("--infer-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=448, help="square images; 448 -> 256 image tokens")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--lora-r", type=int, default=16, help="reference LoRA rank (kit: its config, r=16)")
    parser.add_argument("--ref", nargs="*", choices=["usual", "nograd"], default=["usual"], help="reference loops")
    parser.add_argument("--ref-infer-all", action="store_true", help="time inference for every reference variant")
    parser.add_argument("--no-kit", action="store_true")
    parser.add_argument("--loader", action="store_true", help="also time kit's image loader alone")
    parser.add_argument(
        "--set", nargs="*", default=[], help="kit config overrides, e.g. vlm.gradient_checkpointing=false"
    )
    parser.add_argument("--workers", type=int, default=-1, help="kit DataLoader workers (-1: kit's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kit-bench-vlm"), help="checkpoints and images")
    parser.add_argument("--budget-s", type=float, default=0, help="skip the larger-batch search after this many s")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.image_size % 28:
        parser.error("--image-size must be a multiple of 28")
    device = torch.device(args.device)
    if args.max_batch is None:
        args.max_batch = 64 if device.type == "cuda" else max(args.batch)

    import peft
    import transformers

    from kit.train.runtime import set_deterministic

    set_deterministic(False)  # what kit's fit_fold sets: cuDNN autotune, TF32 for fp32 matmuls (both loops)
    meta = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
    if "qlora" in args.mode:
        try:
            import bitsandbytes

            meta["bitsandbytes"] = bitsandbytes.__version__
        except ImportError as e:  # each qlora configuration then records its own failure
            meta["bitsandbytes"] = f"missing ({e})"
    print(json.dumps(meta), flush=True)
    results = Results(args.out, meta)

    n_images = max(
        sum((args.warmup + args.steps) * b for b in set(args.batch)),
        (args.warmup + args.steps) * max(args.max_batch, max(args.batch)),
        (args.warmup + args.steps) * args.infer_batch,
    )
    start = time.perf_counter()
    paths = write_images(args.work / f"images{args.image_size}", n_images, args.image_size)
    results.add(phase="images", batch=n_images, seconds=round(time.perf_counter() - start, 1), note=str(args.work))
    for arch in args.arch:
        try:
            model_dir, info = build_checkpoint(
                arch, args.work / f"qwen2.5-vl-{arch}-random", device, args.image_size**2
            )
        except Exception as e:
            results.add(arch=arch, phase="build", note=f"failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        note = f"{info['params_b']}B params (vision {info['vision_params_b']}B)" + (" reused" if info["reused"] else "")
        results.add(arch=arch, phase="build", seconds=info["build_s"] + info["save_s"], note=note)
        for mode in args.mode:
            runs = [] if args.no_kit else [("kit", None)]
            runs += [("ref", v) for v in args.ref]
            for loop, variant in runs:
                try:
                    if loop == "kit":
                        run_kit(arch, mode, model_dir, paths, args, results, device)
                    else:
                        run_ref(arch, mode, variant, model_dir, paths[0], args, results, device)
                except Exception as e:  # a failed configuration must not lose the rest
                    label = loop if variant is None else f"ref-{variant}"
                    note = "OOM" if is_oom(e) else f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    results.add(arch=arch, mode=mode, loop=label, phase="setup", note=note)
                    if not is_oom(e):
                        import traceback

                        traceback.print_exc()
                free_memory()
                if device.type == "cuda":
                    left = torch.cuda.memory_allocated(device) / 2**30
                    if left > 0.5:
                        print(f"warning: {left:.1f} GiB still allocated after {loop}", flush=True)
    print("\nkit / reference (same arch, mode, batch):", flush=True)
    for row in results.summary():
        print(json.dumps(row), flush=True)
    if args.out:
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
