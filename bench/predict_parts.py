"""Where a decode-once prediction batch's GPU time goes: the models at several batch sizes, and the GPU resize.

bench_bundle's models-alone line is the ceiling of decode-once prediction; this takes it apart on one GPU,
in one process, with kit's own prediction call (`tta_logp`: normalise, each view, graphed forward, softmax):

- models alone at `--rows` rows per forward (each new size pays cuDNN's planning once, untimed);
- the same with conv and linear weights already bf16 (what autocast casts inside every replayed forward);
- Pillow's bicubic resize on the GPU (kit.infer.pillow_resize) of decoded 512x384 photos, per image;
- the pinned host-to-device copy of those decoded photos, per image;
- the whole stream (kit.infer.streams.stream: workers decode, GPU resize, every model) over `--jpegs`
  synthetic 512x384 JPEGs at each of `--stream-workers` decoding processes.

    python bench/predict_parts.py --model efficientnet_lite0 --folds 5 --rows 64 128 256 --stream-workers 8 16
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def gpu_seconds(fn, repeat: int) -> float:
    """Seconds per call of fn on the GPU, after one untimed call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    tick = time.perf_counter()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    wall = (time.perf_counter() - tick) / repeat
    return max(start.elapsed_time(end) / 1e3 / repeat, wall)


def main() -> None:
    import timm

    from kit.infer.pillow_resize import pillow_order, resize_batch
    from kit.infer.timm_predict import VIEWS, Normalizer, tta_logp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--tta", nargs="+", default=["none", "hflip"])
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--jpegs", type=Path, default=Path(tempfile.gettempdir()) / "kit-predict-parts")
    p.add_argument("--stream-workers", type=int, nargs="*", default=[])
    args = p.parse_args()
    assert all(view in VIEWS for view in args.tta)
    device, size = torch.device("cuda"), args.img_size
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base = timm.create_model(args.model, pretrained=False, num_classes=4).eval()
    folds = [copy.deepcopy(base).to(device, memory_format=torch.channels_last) for _ in range(args.folds)]
    normalize = Normalizer([0.5] * 3, [0.25] * 3, True).to(device)
    print(
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {args.model} @ {size} px, "
        f"{args.folds} folds x {len(args.tta)} views, {args.images} images per line"
    )

    def models(rows: int, nets) -> float:
        batch = torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, device=device)

        def run():
            with torch.inference_mode():
                for net in nets:
                    tta_logp(net, batch, normalize, args.tta, "auto", rows, "auto")

        tick = time.perf_counter()
        for _ in range(3):  # plans, timing, capture (kit.infer.graphed_forward)
            run()
        torch.cuda.synchronize()
        planned = time.perf_counter() - tick
        per_batch = gpu_seconds(run, max(4, args.images // rows))
        return per_batch / rows, planned

    for rows in args.rows:
        per_image, planned = models(rows, folds)
        print(f"models alone, {rows} rows: {1 / per_image:,.0f} test images/s ({planned:.1f} s to plan and capture)")
    halves = [copy.deepcopy(net) for net in folds]
    for net in halves:  # what autocast casts at every forward, cast once (batch norms stay float32)
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                module.to(torch.bfloat16)
    for rows in args.rows[:1]:
        per_image, _ = models(rows, halves)
        print(f"models alone, {rows} rows, conv and linear weights already bf16: {1 / per_image:,.0f} test images/s")

    order = pillow_order()
    decoded = torch.randint(0, 256, (32, 384, 512, 3), dtype=torch.uint8).pin_memory()
    on_gpu = decoded.to(device)
    resize = gpu_seconds(lambda: resize_batch(on_gpu, size, order), 20) / len(decoded)
    copy_in = gpu_seconds(lambda: decoded.to(device, non_blocking=True), 20) / len(decoded)
    print(f"GPU resize 512x384 -> {size}: {resize * 1e6:.0f} us per image ({1 / resize:,.0f} images/s)")
    print(f"pinned copy of a decoded 512x384 photo: {copy_in * 1e6:.0f} us per image ({1 / copy_in:,.0f} images/s)")
    if args.stream_workers:
        streams(args, folds, normalize, device)


def streams(args: argparse.Namespace, folds: list, normalize, device: torch.device) -> None:
    """decode-once's stream as infer.py runs it (the models at their 64 rows), at several worker counts."""
    from kit.bench import write_jpegs
    from kit.infer.images import ImageFiles
    from kit.infer.streams import stream
    from kit.infer.timm_predict import tta_logp

    rows = args.rows[0]
    paths = sorted(str(p) for p in args.jpegs.glob("*.jpg"))
    if len(paths) != args.images:
        paths = write_jpegs(args.jpegs, args.images)
    models = [lambda x, net=net: tta_logp(net, x, normalize, args.tta, "auto", rows, "auto") for net in folds]
    for workers in args.stream_workers:
        dataset = ImageFiles(paths, args.img_size).decoded_for(device)
        tick = time.perf_counter()
        stream(models, dataset, rows, workers, device, f"{workers} workers", [rows] * len(models))
        seconds = time.perf_counter() - tick
        print(f"stream, {workers} workers, {rows} rows: {seconds:.2f} s ({len(paths) / seconds:,.0f} images/s)")


if __name__ == "__main__":
    main()
