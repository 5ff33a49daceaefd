"""A bundle's run-time estimate: each member's fold model timed on random images at its input size.

    lines = estimate(bundle, collected, n_test=8000, device="auto")
    lines[0]   # "about 412 s on cuda for 8000 test images"

seconds = sum over members of test images x TTA views x folds / measured images per second. Image
decoding is not counted: it runs in worker processes alongside the model.
"""

from __future__ import annotations

import time

import torch

BUDGET_S = 1.5  # timing per member, after one warm-up batch


def _timm_rate(spec: dict, weights, device: torch.device) -> float:
    from kit.infer.timm_predict import TimmFold
    from kit.train.runtime import autocast

    fold = TimmFold(spec, weights, device)
    batch = min(spec["batch_size"], 32)
    size = spec["img_size"]
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    done, start = -1, 0.0
    with torch.no_grad():
        while done < 2 or time.perf_counter() - start < BUDGET_S:
            if done == 0:
                start = time.perf_counter()
            with autocast(device, spec["precision"]):
                fold.model(fold.normalize(images))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done += 1
    return done * batch / (time.perf_counter() - start)


def _runs(node: dict, seen: dict[str, dict]) -> dict[str, dict]:
    if node["kind"] == "run":
        seen.setdefault(node["key"], node)
    else:
        for member in node["members"]:
            _runs(member, seen)
    return seen


def estimate(bundle: dict, collected, n_test: int, device: str = "auto") -> list[str]:
    from kit.train.runtime import resolve_device

    dev = resolve_device(device)
    total, lines, unmeasured = 0.0, [], []
    for key, node in _runs(bundle["root"], {}).items():
        spec = node["spec"]
        if spec["family"] != "timm":
            unmeasured.append(key)
            continue
        rate = _timm_rate(spec, collected.weights[node["folds"][0]["files"]["model"]], dev)
        views = len(spec["tta"]) * len(node["folds"])
        seconds = n_test * views / rate
        total += seconds
        lines.append(
            f"{key}: {rate:.1f} images/s x {n_test} images x {len(spec['tta'])} TTA x {len(node['folds'])} folds"
            f" = {seconds:.1f} s"
        )
    head = f"about {total:.0f} s" if total >= 10 else f"about {total:.1f} s"
    head += f" on {dev.type} for {n_test} test images"
    if unmeasured:
        head += f", plus the VLM members {', '.join(unmeasured)} (not measured: their base model is given at run time)"
    return [head, *lines]
