"""Decode each test image once per resolution, and feed that one batch to every model of the resolution.

The timm members of a recipe tree and the probes' frozen timm encoders are grouped by input size. For
each size one loader streams the images (workers decode, pinned memory; on CUDA the GPU resizes them,
kit.infer.images.to_device), each uint8 batch goes to the device once, and every fold model with every
TTA view of its member (`tta_logp`, through TimmFold.logp) and every encoder runs on it. Outputs stay on
the device until the stream ends, so no batch waits for a host copy. The fold models of a size stay on
the device together; when their weights exceed the memory budget they are split into groups, each group
streaming the images once more (`Decodes` says so).

    decodes = decode_once(tree, paths, ctx)   # fills ctx.done (timm runs) and ctx.features (probe encoders)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kit.errors import KitError
from kit.infer.images import ImageFiles, image_batches, prefetch_batches, to_device
from kit.infer.progress import progress
from kit.infer.timm_predict import TimmFold, build_timm_model, pad_rows, prediction_rows, raise_bad_image
from kit.preds import mean_in_prob_space
from kit.train.runtime import set_tf32

BUDGET_SHARE = 0.5  # of the free device (or host) memory that fold weights may take; the rest is activations
CHUNK = 32  # images a worker decodes per item of the loader


@dataclass
class Job:
    """One fold model, or a probe's encoder (fold None), fed every batch of its resolution."""

    node: dict
    fold: int | None
    weights: Path
    nbytes: int  # its weights file's size: what its parameters take on the device


@dataclass
class Decodes:
    """How often the images were decoded: resolution -> decode passes (more than 1: over the budget)."""

    passes: dict[int, int] = field(default_factory=dict)
    budget: int = 0

    def describe(self) -> str:
        once = [f"{size} px" for size, n in self.passes.items() if n == 1]
        more = [f"{n}x at {size} px" for size, n in self.passes.items() if n > 1]
        text = f"each image decoded once at {', '.join(once)}" if once else "each image decoded"
        if more:
            gib = self.budget / 2**30
            text += f"{',' if once else ''} {', '.join(more)} (fold weights over the {gib:.1f} GiB memory budget)"
        return text if self.passes else ""


def stream_runs(node: dict, seen: dict[str, dict] | None = None) -> dict[str, dict]:
    """The tree's timm and probe runs (a shared member once), in tree order."""
    seen = {} if seen is None else seen
    if node["kind"] == "ensemble":
        for member in node["members"]:
            stream_runs(member, seen)
    elif node["spec"]["family"] in ("timm", "probe"):
        seen.setdefault(node["key"], node)
    return seen


def jobs_by_size(tree: dict, weights: Path, skip: set[str]) -> dict[int, list[Job]]:
    out: dict[int, list[Job]] = {}
    for key, node in stream_runs(tree).items():
        if key in skip:
            continue
        if node["spec"]["family"] == "probe":
            files = [(None, weights / node["encoder"])]
        else:
            files = [(fold["fold"], weights / fold["files"]["model"]) for fold in node["folds"]]
        jobs = out.setdefault(int(node["spec"]["img_size"]), [])
        jobs += [Job(node, fold, path, path.stat().st_size if path.is_file() else 0) for fold, path in files]
    return out


def memory_budget(device: torch.device) -> int:
    """Bytes of fold weights one stream may keep on `device`: a share of its free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_SHARE)
    return int(host_available() * BUDGET_SHARE)


def host_available() -> int:
    """Bytes of host memory available, page cache included (Linux MemAvailable), else free pages, else 16 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def fold_groups(jobs: list[Job], budget: int) -> list[list[Job]]:
    """Consecutive jobs whose weights fit `budget` together (a job larger than it alone)."""
    groups: list[list[Job]] = []
    used = 0
    for job in jobs:
        if not groups or used + job.nbytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(job)
        used += job.nbytes
    return groups


def stream_batch(jobs: list[Job], device: torch.device, requested: int | None) -> int:
    """--batch-size when given, else the largest prediction batch of the members as kit's own predictions
    ran it (kit.infer.timm_predict.prediction_rows: a batch's size changes outputs only by float rounding)."""
    if requested:
        return requested
    return max(prediction_rows(job.node["spec"], device) for job in jobs)


def build(jobs: list[Job], device: torch.device) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Each job's model on the device; the folds of a run copy one architecture build."""
    from kit.infer.probe_predict import Encoder

    templates: dict[str, torch.nn.Module] = {}
    out = []
    for job in jobs:
        spec = job.node["spec"]
        if job.fold is None:
            out.append(Encoder.load(spec, job.weights, device))
            continue
        key = job.node["key"]
        if key not in templates:
            templates[key] = build_timm_model(spec)
        out.append(TimmFold(spec, job.weights, device, template=templates[key]).logp)
    return out


def device_batches(loader, batch_size: int, device: torch.device, size: int) -> Iterator[torch.Tensor]:
    """uint8 batches [B, 3, size, size] of exactly `batch_size` rows (the last one fewer) on the device, in
    order, from the loader's chunks: each chunk is copied once, asynchronously (resized there when it
    travels decoded), and joined to the others on the device."""
    pending: list[torch.Tensor] = []
    rows = 0
    for images, extra in loader:
        raise_bad_image(extra)
        pending.append(to_device(images, size, device))
        rows += len(pending[-1])  # a Packed chunk's len is its two fields, not its images
        while rows >= batch_size:
            joined = pending[0] if len(pending) == 1 else torch.cat(pending)
            yield joined[:batch_size]
            pending = [joined[batch_size:]] if len(joined) > batch_size else []
            rows -= batch_size
    if rows:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


@torch.inference_mode()
def stream(
    models: list[Callable],
    dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    desc: str,
    rows: list[int] | None = None,
) -> list:
    """Every model's outputs [N, D] float32 (numpy) over the dataset's batches, each image decoded once.

    Workers decode chunks of at most CHUNK images, so the first batch is ready after CHUNK decodes per
    worker rather than `batch_size`; the models see batches of `batch_size` rows all the same. On CUDA
    model i sees each batch in pieces of exactly rows[i] rows (prediction_rows: the shape its run predicted
    with during training), a ragged piece padded: the same kernels as kit's own predictions, no new plans.
    """
    if not len(dataset):
        raise KitError("no images to predict")
    chunk, size = min(batch_size, CHUNK), dataset.transform.size
    # a decoded photo is some 4x the pixels of its resized self: fewer chunks ahead in shared memory
    prefetch = prefetch_batches(chunk, 2 * size if getattr(dataset, "decoded", False) else size, workers)
    loader = image_batches(dataset, chunk, workers, device, prefetch)
    outs: list[torch.Tensor | None] = [None] * len(models)
    start = 0
    for images in device_batches(progress(loader, desc, unit="chunk"), batch_size, device, size):
        stop = start + len(images)
        for i, model in enumerate(models):
            y = _in_pieces(model, images, rows[i]) if rows and images.is_cuda else model(images)
            if outs[i] is None:  # shapes are known on the host: no device round trip per batch
                outs[i] = torch.empty((len(dataset), y.shape[1]), dtype=torch.float32, device=device)
            outs[i][start:stop] = y
        start = stop
    return [out.cpu().numpy() for out in outs]  # one copy per model, once the stream is done


def _in_pieces(model: Callable, images: torch.Tensor, rows: int) -> torch.Tensor:
    """model's outputs for a batch fed `rows` rows at a time, the last piece padded to `rows`."""
    return torch.cat([model(pad_rows(piece, rows))[: len(piece)] for piece in images.split(rows)])


def _desc(jobs: list[Job], size: int, part: str) -> str:
    names: dict[str, int] = {}
    for job in jobs:
        names[job.node["name"]] = names.get(job.node["name"], 0) + 1
    what = ", ".join(f"{name} ({n} {'folds' if n > 1 else 'model'})" for name, n in names.items())
    return f"{size} px{part}: {what}"


def decode_once(tree: dict, paths: list[str], ctx) -> Decodes:
    """Predict every timm run and encode every probe run of `tree` (kit.infer.predict.Context `ctx`)."""
    by_size = jobs_by_size(tree, ctx.weights, set(ctx.done) | set(ctx.features))
    budget = ctx.model_bytes if ctx.model_bytes is not None else memory_budget(ctx.device)
    decodes = Decodes(budget=budget)
    per_fold: dict[str, dict[int, np.ndarray]] = {}
    for size, jobs in by_size.items():
        groups = fold_groups(jobs, budget)
        decodes.passes[size] = len(groups)
        if len(groups) > 1:
            total = sum(job.nbytes for job in jobs) / 2**30
            print(
                f"note: {size} px: the weights of its {len(jobs)} models ({total:.1f} GiB) exceed the "
                f"{budget / 2**30:.1f} GiB memory budget: the images are decoded {len(groups)} times",
                file=sys.stderr,
            )
        for g, group in enumerate(groups):
            dataset = ctx.images(paths, size) if ctx.images is not None else ImageFiles(paths, size)
            dataset = dataset.decoded_for(ctx.device) if isinstance(dataset, ImageFiles) else dataset
            batch = stream_batch(group, ctx.device, ctx.batch_size)
            part = f" (part {g + 1}/{len(groups)})" if len(groups) > 1 else ""
            models = build(group, ctx.device)
            # TF32 as these runs trained (kit.train.runtime.set_tf32): on unless every one was deterministic
            set_tf32(not all(job.node["spec"].get("deterministic", False) for job in group))
            # each member's own batch shape, unless --batch-size names one for all
            rows = None if ctx.batch_size else [prediction_rows(job.node["spec"], ctx.device) for job in group]
            outs = stream(models, dataset, batch, ctx.workers, ctx.device, _desc(group, size, part), rows)
            del models
            for job, out in zip(group, outs, strict=True):
                if job.fold is None:
                    ctx.features[job.node["key"]] = out
                else:
                    per_fold.setdefault(job.node["key"], {})[job.fold] = out
            ctx.passes += len(group)
    nodes = stream_runs(tree)
    for key, folds in per_fold.items():
        ctx.done[key] = mean_in_prob_space(np.stack([folds[fold["fold"]] for fold in nodes[key]["folds"]]))
    return decodes
