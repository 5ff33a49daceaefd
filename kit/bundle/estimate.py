"""A bundle's run-time estimate: what one `python infer.py` run pays, part by part, from rates measured
on the machine that builds the bundle (kit.bundle.rates; a few seconds in all):

    lines = estimate(bundle, collected, test_paths, device="auto")
    lines[0]   # "about 41 s on cuda for 8000 test images (start-up 6.1 s, weights check 0.4 s, ...)"

- start-up: a fresh interpreter importing torch, timm, ... (transformers and peft for VLM members);
- weights check: the weight bytes over the sha256 rate, on the check's threads;
- model builds: per member the architecture once, each fold's weights, the first fold's and batch's extra;
- images and models: per input size the images decoded once by the workers while every fold model and
  TTA view of that size runs (images x TTA x folds / images per second); on a GPU the two overlap,
  on the CPU they share the cores;
- VLM members, when their base model is a local folder of at most 2 GiB: each fold's load, fold 0's
  pass (decode, tower, language model) and the other folds' passes on the shared tower outputs;
- the CSV: its values formatted at the measured rate.
Ensemble recipes and image matching are not counted (milliseconds).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from kit.bundle import rates
from kit.train.runtime import usable_cores

SAMPLE_IMAGES = 12  # test images decoded per input size to measure the decode rate
VLM_SAMPLE = 4
VLM_MEASURED_BYTES = 2 << 30  # larger base models take too long to load just to time them


def _runs(node: dict, seen: dict[str, dict]) -> dict[str, dict]:
    if node["kind"] == "run":
        seen.setdefault(node["key"], node)
    else:
        for member in node["members"]:
            _runs(member, seen)
    return seen


def _sample(paths: list[str]) -> list[str]:
    step = max(1, len(paths) // SAMPLE_IMAGES)
    return [p for p in paths[::step][:SAMPLE_IMAGES] if Path(p).is_file()]


def _s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2f} s"


def startup(needs: set[str]) -> tuple[float, str]:
    names = ["torch", "numpy", "PIL.Image", "timm", "safetensors.torch", "tqdm"]
    names += ["transformers", "peft"] if "vlm" in needs else []
    names = [n for n in names if importlib.util.find_spec(n.split(".")[0]) is not None]
    seconds = rates.startup_seconds(tuple(names))
    # imported here too, so that no member's timing below counts them again: in a fresh `kit bundle` the
    # VLM's first load read 3 s of which most was `import transformers, peft`, already in this part
    for name in names:
        importlib.import_module(name)
    return seconds, f"start-up: a fresh python importing {', '.join(names)}: {_s(seconds)}"


def weights_check(collected) -> tuple[float, str]:
    sizes = {rel: path.stat().st_size for rel, path in collected.weights.items() if path.is_file()}
    for rel, tensors in collected.generated.items():
        sizes[rel] = sum(t.numel() * t.element_size() for t in tensors.values())
    if not sizes:
        return 0.0, "weights check: no files"
    files = [p for p in collected.weights.values() if p.is_file()]
    rate = rates.hash_rate(max(files, key=lambda p: p.stat().st_size) if files else None)
    threads = max(1, min(8, len(sizes), usable_cores()))  # as kit.infer.manifest.check_files
    total, largest = sum(sizes.values()), max(sizes.values())
    seconds = max(total / (rate * threads), largest / rate)
    mib, gib_s = total / 2**20, rate / 2**30
    return seconds, f"weights check: {mib:.1f} MiB sha256 at {gib_s:.2f} GiB/s x {threads} threads: {_s(seconds)}"


def _member(node: dict, collected, device: torch.device) -> rates.Timed:
    spec = node["spec"]
    if spec["family"] == "probe":
        return rates.time_probe_encoder(spec, collected.generated[node["encoder"]], device)
    return rates.time_timm_member(spec, collected.weights[node["folds"][0]["files"]["model"]], device)


def _passes(node: dict) -> tuple[int, str]:
    spec = node["spec"]
    if spec["family"] == "probe":
        return 1, "1 encoder pass"
    return len(spec["tta"]) * len(node["folds"]), f"{len(spec['tta'])} TTA x {len(node['folds'])} folds"


def stream(size: int, members: list, n: int, sample: list[str], device: torch.device) -> tuple[float, list[str]]:
    """One input size: the images decoded once while its members' models run."""
    workers, cores = _decode_workers(device), usable_cores()
    lines, models = [], 0.0
    for node, timed in members:
        views, how = _passes(node)
        seconds = n * views / timed.rate
        models += seconds
        lines.append(f"  {node['key']}: {timed.rate:.1f} images/s x {n} images x {how} = {_s(seconds)}")
    per_image = rates.decode_seconds(sample, size, device) if sample else 0.0
    decode = n * per_image
    # on a GPU the main process keeps a core busy launching kernels; on the CPU the formula below shares them
    lanes = max(1, min(workers, cores - 1 if device.type == "cuda" else cores))
    if workers == 0:
        wall = decode + models  # decoded in the main process, between the batches
    elif device.type == "cuda":
        wall = max(decode / lanes, models)  # workers decode while the GPU runs the models
    else:
        wall = max(decode / lanes, decode / cores + models)  # both on the CPU's cores
    start = rates.loader_start_seconds(sample, size, workers) if sample else 0.0
    where = f"/ {lanes} workers" if workers else "in the main process"
    how = f"{n} images x {per_image * 1e3:.1f} ms decode {where}" if sample else "decode not measured"
    head = f"{size} px: {how} beside {_s(models)} of model passes, + {_s(start)} workers' start = {_s(wall + start)}"
    return wall + start, [head, *lines]


def _decode_workers(device: torch.device) -> int:
    from kit.infer.images import decode_workers

    return decode_workers(-1, device)


def vlm_member(node: dict, collected, device: torch.device, n: int, sample: list[str]) -> tuple[float | None, str]:
    base = collected.base_models.get(node["name"], "")
    folder = Path(base)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else None
    if not sample or size is None or size > VLM_MEASURED_BYTES:
        why = "no test image here" if not sample else f"its base model {base} is not a local folder"
        if size is not None and size > VLM_MEASURED_BYTES:
            why = f"its base model is {size / 2**30:.1f} GiB: too long to load only to time it"
        return None, f"{node['key']}: not measured ({why})"
    files = {role: collected.weights[rel] for role, rel in node["folds"][0]["files"].items()}
    timed = rates.time_vlm_member(node["spec"], base, files, device, sample[:VLM_SAMPLE])
    k = len(node["folds"])
    loads = timed.build_s + (k - 1) * timed.rebuild_s
    seconds = loads + timed.first_s + n * timed.fresh_s + (k - 1) * n * timed.cached_s
    return seconds, (
        f"{node['key']}: loads {_s(timed.build_s)} (fold 0) + {k - 1} x {_s(timed.rebuild_s)} + first pass "
        f"{_s(timed.first_s)} + {n} images x "
        f"{timed.fresh_s * 1e3:.0f} ms (fold 0) + {k - 1} folds x {n} images x {timed.cached_s * 1e3:.0f} ms "
        f"(tower outputs shared) = {_s(seconds)}"
    )


def csv_seconds(n: int, classes: int) -> tuple[float, str]:
    from kit.infer.submission import format_csv

    rows = max(1, min(n, 20_000 // max(classes, 1)))
    probs = np.random.default_rng(0).dirichlet(np.ones(classes), size=rows)
    start = time.perf_counter()
    format_csv(["id", *map(str, range(classes))], [str(i) for i in range(rows)], probs)
    seconds = (time.perf_counter() - start) * n / rows
    return seconds, f"CSV: {n} rows x {classes} values: {_s(seconds)}"


def estimate(bundle: dict, collected, test_paths: list[str], device: str = "auto") -> list[str]:
    from kit.train.runtime import resolve_device

    dev = resolve_device(device)
    n, sample = len(test_paths), _sample(test_paths)
    parts: dict[str, float] = {}
    parts["start-up"], line = startup(collected.needs)
    lines = [line]
    parts["weights check"], line = weights_check(collected)
    lines.append(line)
    by_size: dict[int, list] = {}
    parts["model builds"] = 0.0
    runs = _runs(bundle["root"], {})
    for key, node in runs.items():
        if node["spec"]["family"] == "vlm":
            continue
        timed = _member(node, collected, dev)
        k = 1 if node["spec"]["family"] == "probe" else len(node["folds"])
        seconds = timed.build_s + k * timed.load_s + timed.first_s
        parts["model builds"] += seconds
        lines.append(
            f"{key}: build {_s(timed.build_s)} + {k} x {_s(timed.load_s)} weight load + first fold and batch "
            f"{_s(timed.first_s)} = {_s(seconds)}"
        )
        by_size.setdefault(int(node["spec"]["img_size"]), []).append((node, timed))
    parts["images and models"] = 0.0
    for size, members in by_size.items():
        seconds, more = stream(size, members, n, sample, dev)
        parts["images and models"] += seconds
        lines += more
    unmeasured = []
    for key, node in runs.items():
        if node["spec"]["family"] == "vlm":
            seconds, line = vlm_member(node, collected, dev, n, sample)
            lines.append(line)
            if seconds is None:
                unmeasured.append(key)
            else:
                parts["VLM members"] = parts.get("VLM members", 0.0) + seconds
    parts["CSV"], line = csv_seconds(n, len(bundle["classes"]))
    lines.append(line)
    total = sum(parts.values())
    shown = ", ".join(f"{name} {_s(seconds)}" for name, seconds in parts.items())
    head = f"about {_s(total)} on {dev.type} for {n} test images ({shown})"
    if unmeasured:
        head += f", plus the VLM members {', '.join(unmeasured)} (not measured, see below)"
    return [head, *lines]
