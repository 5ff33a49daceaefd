"""Where head-mode inference spends its time: decode, vision tower, language model, per variant.

    python bench/profile_vlm_infer.py --arch 3b --batch 32 --out profile.json

Loads the random-weight Qwen2.5-VL checkpoint of bench_vlm.py through kit's own path, then times, on one
batch of 448x448 images, (a) the DataLoader alone (JPEG decode + Qwen's processor in workers), (b) the
frozen vision tower on ready pixels, (c) the language model + head on ready features, and (d) kit's
predict_batches end to end; for each inference variant in turn (cumulative): as trained (LoRA adapters
live), LoRA merged into the weights (what kit's predictors load), and torch.compile on the blocks'
MLPs and norms. kit aligns the vision MLP (kit.vlm.model.align_vision_mlp) when it loads the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_vlm


def timed(fn, device, repeats: int) -> float:
    fn()
    bench_vlm.sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    bench_vlm.sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="3b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kit-bench-vlm"))
    parser.add_argument("--variants", nargs="+", default=["adapters", "merged", "compiled"])
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables for the first variant")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = 448 if args.arch != "tiny" else 56
    from kit.train.runtime import autocast
    from kit.vlm import head as head_mode
    from kit.vlm.inputs import image_loader

    model_dir, _ = bench_vlm.build_checkpoint(args.arch, args.work / args.arch, device, size * size)
    paths = bench_vlm.write_images(args.work / "images", args.batch * 10, size)
    ns = types.SimpleNamespace(
        infer_batch=args.batch, image_size=size, prompt=bench_vlm.DEFAULT_PROMPT, device=args.device, workers=-1, set=[]
    )
    cfg = bench_vlm.kit_config(model_dir, "lora", args.batch, ns)
    prompter, vl, head = head_mode.build(cfg, device, trainable=False)
    vl.train(False)
    head.eval()
    rows = np.arange(len(paths))
    workers = 8
    batches = list(image_loader(prompter, paths, rows, args.batch, workers))
    pixels = batches[0][1]
    results = []

    @torch.no_grad()
    def vision():
        return vl.encode_images(pixels)

    images = vision()

    @torch.no_grad()
    def language():
        with autocast(device, cfg.precision):
            return head_mode.logits(cfg, prompter, vl, head, images)

    def loader():
        for _ in image_loader(prompter, paths, rows, args.batch, workers):
            pass

    def end_to_end() -> float:
        """kit's predict_batches over fresh images, the first two batches (worker start-up) untimed."""
        from kit.vlm.features import encoded_batches

        clock = bench_vlm.Clock(device, 2)
        source = encoded_batches(vl, prompter, paths, rows, args.batch, workers)
        head_mode.predict_batches(cfg, prompter, vl, head, clock.wrap(source, lambda b: len(b[0])), device)
        return clock.rate()[0]

    decode = timed(loader, device, 1) / (len(paths) / args.batch)  # includes the workers' start-up
    reference = language().float()
    for variant in args.variants:
        if variant == "merged":
            vl.model.merge_adapter()
        elif variant == "compiled":
            compile_blocks(vl)
        if args.profile and variant == args.variants[0]:
            profile(vision, language, device)
        row = {
            "variant": variant,
            "batch": args.batch,
            "decode_s": round(decode, 4),
            "vision_s": round(timed(vision, device, args.repeats), 4),
            "language_s": round(timed(language, device, args.repeats), 4),
            "end_to_end_img_s": round(end_to_end(), 1),
            "max_abs_logit_diff": float((language().float() - reference).abs().max()),
        }
        row["compute_img_s"] = round(args.batch / (row["vision_s"] + row["language_s"]), 1)
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        args.out.write_text(
            json.dumps(
                {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": results}, indent=1
            )
        )


def compile_blocks(vl) -> None:
    """torch.compile the per-token parts (MLPs and norms) of every vision and language block."""
    layers = [*vl.core.visual.blocks, *vl.language_model.layers]
    for layer in layers:
        for name in ("mlp", "norm1", "norm2", "input_layernorm", "post_attention_layernorm"):
            if hasattr(layer, name):
                setattr(layer, name, torch.compile(getattr(layer, name)))


def profile(vision, language, device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in (("vision", vision), ("language", language)):
        with torch_profile(activities=activities) as prof:
            fn()
            bench_vlm.sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"== {name}: top by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
        print(f"== {name}: top by self cpu time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
