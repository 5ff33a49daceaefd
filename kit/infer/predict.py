"""A whole run or ensemble predicted from image files, as `kit submit` would submit it.

A bundle's recipe is a tree: a run node holds its family's prediction spec and one weights entry per
fold (a probe run also its frozen encoder, whose features its heads and ensembles share); an ensemble
node holds its recipe.json, its params file and its members (runs or ensembles). Each fold model
predicts every image (TTA averaged in probability space), the folds are averaged in probability space
(kit.preds.mean_in_prob_space, as kit.train.driver.assemble does), and an ensemble applies its recipe
to its members' averages (kit.ensemble.apply, as kit ensemble made test.npz). The timm runs and probe
encoders are predicted first, each image decoded once per resolution for all of them
(kit.infer.streams); a VLM run's folds share its images' vision-tower outputs:

    ctx = Context(weights=Path("weights"), device=torch.device("cpu"), workers=4)
    logp = predict_tree(bundle["root"], paths, ctx)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kit.errors import KitError
from kit.infer.streams import Decodes, decode_once
from kit.preds import mean_in_prob_space
from kit.train.runtime import set_tf32


@dataclass
class Context:
    weights: Path  # the bundle's weights/ folder: every file path in the tree is relative to it
    device: torch.device
    workers: int = 0
    batch_size: int | None = None  # None: each member's own prediction batch
    base_models: dict[str, str] = field(default_factory=dict)  # VLM member name -> its base model folder
    done: dict[str, np.ndarray] = field(default_factory=dict)  # node key -> logp: a shared member runs once
    features: dict[str, np.ndarray] = field(default_factory=dict)  # probe run key -> its encoder's features
    passes: int = 0  # fold-model passes over the images so far (progress labels)
    total_passes: int = 0
    # (paths, img_size) -> the ImageFiles to stream; None: decode the files (kit predict: its image cache)
    images: Callable | None = None
    model_bytes: int | None = None  # fold weights one stream keeps on the device; None: half the free memory
    decodes: Decodes | None = None  # set once the timm runs and probe encoders are predicted


def count_passes(node: dict, seen: set[str] | None = None) -> int:
    """Fold-model passes over the images the tree needs (a shared member counted once)."""
    seen = set() if seen is None else seen
    if node["key"] in seen:
        return 0
    seen.add(node["key"])
    if node["kind"] == "ensemble":
        return sum(count_passes(m, seen) for m in node["members"])
    return 1 if node["spec"]["family"] == "probe" else len(node["folds"])


def predict_tree(node: dict, paths: list[str], ctx: Context) -> np.ndarray:
    """Log-probabilities [N, C] float32 of a run or ensemble node."""
    if ctx.decodes is None:
        ctx.total_passes = ctx.total_passes or count_passes(node)
        ctx.decodes = decode_once(node, paths, ctx)
    if node["key"] not in ctx.done:
        if node["kind"] == "ensemble":
            ctx.done[node["key"]] = _ensemble(node, paths, ctx)
        else:
            ctx.done[node["key"]] = mean_in_prob_space(np.stack(list(_folds(node, paths, ctx))))
    return ctx.done[node["key"]]


def _label(node: dict, fold: int | None, ctx: Context) -> str:
    ctx.passes += 1
    what = "encoder" if fold is None else f"fold {fold}"
    return f"[{ctx.passes}/{max(ctx.passes, ctx.total_passes)}] {node['name']} {what}"


def probe_features(node: dict, paths: list[str], ctx: Context) -> np.ndarray:
    """A probe run's frozen-encoder features, computed once: its heads and ensembles share them."""
    if node["key"] not in ctx.features:
        from kit.infer.probe_predict import encode

        weights = ctx.weights / node["encoder"]
        desc = _label(node, None, ctx)
        ctx.features[node["key"]] = encode(node["spec"], weights, ctx.device, paths, ctx.workers, ctx.batch_size, desc)
    return ctx.features[node["key"]]


def _folds(node: dict, paths: list[str], ctx: Context):
    """Each fold's log-probabilities in turn (timm runs: already predicted by decode_once)."""
    family = node["spec"]["family"]
    if family == "vlm":
        from kit.infer.vlm_predict import VlmFold, vision_cache

        base = ctx.base_models.get(node["name"])
        if base is None:
            raise KitError(f"{node['name']}: a VLM member needs its base model folder")
        cache = vision_cache(node["spec"])  # the frozen tower's outputs: fold 0 decodes, the others reuse
        set_tf32(not node["spec"].get("deterministic", False))  # as the run trained (older bundles: the default)
        for fold in node["folds"]:
            files = {role: ctx.weights / rel for role, rel in fold["files"].items()}
            model = VlmFold(node["spec"], base, files, ctx.device)
            yield model(paths, ctx.workers, ctx.batch_size, desc=_label(node, fold["fold"], ctx), cache=cache)
            del model
    elif family == "probe":
        from safetensors.numpy import load_file

        from kit.infer.probe_predict import apply_head

        x = probe_features(node, paths, ctx)
        for fold in node["folds"]:
            yield apply_head(load_file(str(ctx.weights / fold["files"]["head"])), x, node["spec"]["num_classes"])
    else:
        raise KitError(f"{node['name']}: family {family!r} cannot be predicted by this bundle")


def _ensemble(node: dict, paths: list[str], ctx: Context) -> np.ndarray:
    from kit.ensemble.apply import apply_recipe

    members = [predict_tree(member, paths, ctx) for member in node["members"]]
    params = None
    if node.get("params"):
        from safetensors.numpy import load_file

        params = load_file(str(ctx.weights / node["params"]))
    features = None
    if node["recipe"].get("features"):  # fold-invariant features of probe members, in member order
        by_name = {member["name"]: member for member in node["members"]}
        features = np.concatenate([probe_features(by_name[n], paths, ctx) for n in node["recipe"]["features"]], axis=1)
    return apply_recipe(node["recipe"], members, params, features)
