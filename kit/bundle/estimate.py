"""A bundle's run-time estimate: each member's model timed on random images at its input size.

    lines = estimate(bundle, collected, n_test=8000, device="auto")
    lines[0]   # "about 412 s on cuda for 8000 test images"

seconds = sum over members of test images x TTA views x folds / measured images per second (a probe
member: one encoder pass). Image decoding is not counted: it runs in worker processes alongside the
model. VLM members are not measured: their base model is only given at run time.
"""

from __future__ import annotations

import time

import torch

BUDGET_S = 1.5  # timing per member, after one warm-up batch


def _rate(model: torch.nn.Module, normalize, spec: dict, device: torch.device) -> float:
    """Images per second through normalisation and one forward, in the member's precision."""
    from kit.train.runtime import autocast

    batch, size = min(spec["batch_size"], 32), spec["img_size"]
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    done, start = -1, 0.0
    with torch.no_grad():
        while done < 2 or time.perf_counter() - start < BUDGET_S:
            if done == 0:
                start = time.perf_counter()
            with autocast(device, spec["precision"]):
                model(normalize(images))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done += 1
    return done * batch / (time.perf_counter() - start)


def _member_rate(node: dict, collected, device: torch.device) -> float:
    from kit.infer.timm_predict import Normalizer, TimmFold, build_timm_model

    spec = node["spec"]
    if spec["family"] == "timm":
        fold = TimmFold(spec, collected.weights[node["folds"][0]["files"]["model"]], device)
        return _rate(fold.model.eval(), fold.normalize, spec, device)
    model = build_timm_model({**spec, "num_classes": 0}).to(device).eval()  # a probe's encoder
    return _rate(model, Normalizer(spec["mean"], spec["std"], False).to(device), spec, device)


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
        if spec["family"] == "vlm":
            unmeasured.append(key)
            continue
        rate = _member_rate(node, collected, dev)
        if spec["family"] == "probe":
            views, how = 1, "1 encoder pass"
        else:
            views = len(spec["tta"]) * len(node["folds"])
            how = f"{len(spec['tta'])} TTA x {len(node['folds'])} folds"
        seconds = n_test * views / rate
        total += seconds
        lines.append(f"{key}: {rate:.1f} images/s x {n_test} images x {how} = {seconds:.1f} s")
    head = f"about {total:.0f} s" if total >= 10 else f"about {total:.1f} s"
    head += f" on {dev.type} for {n_test} test images"
    if unmeasured:
        head += f", plus the VLM members {', '.join(unmeasured)} (not measured: their base model is given at run time)"
    return [head, *lines]
