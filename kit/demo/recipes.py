"""The demo's members, one recipe per machine: `cpu` (10 minutes on 2 cores) and `gpu` (8 on one H200).

recipe = resolve_recipe("auto")            # gpu when torch sees CUDA, else cpu
for member in members(quick=False, tiny_vlm=path, recipe=recipe): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kit.errors import KitError

RECIPES = ("auto", "cpu", "gpu")


@dataclass
class Member:
    name: str
    note: str
    preset: str | None
    overrides: list[str]


def resolve_recipe(recipe: str) -> str:
    """`auto` becomes gpu on a CUDA machine, else cpu; torch is imported only to find out."""
    if recipe not in RECIPES:
        raise KitError(f"recipe {recipe!r}: must be one of {', '.join(RECIPES)}")
    if recipe != "auto":
        return recipe
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def members(quick: bool, tiny_vlm: Path, recipe: str = "cpu") -> list[Member]:
    """The demo's models for a resolved recipe (cpu or gpu). Quick mode keeps every member, shrunk."""
    if recipe == "gpu":
        return gpu_members(quick, tiny_vlm)
    if recipe == "cpu":
        return cpu_members(quick, tiny_vlm)
    raise KitError(f"recipe {recipe!r}: members need cpu or gpu (resolve auto first)")


def _tiny_vlm(tiny_vlm: Path) -> Member:
    from kit.vlm.tiny import TINY_VLM_SETTINGS

    return Member(
        "tiny_vlm",
        "tiny random Qwen2.5-VL + LoRA head: a pipeline check, not a model",
        None,
        # larger batches, no checkpointing and a short prompt: a tiny model's step is all overhead
        [
            f"model={tiny_vlm}",
            *TINY_VLM_SETTINGS,
            "batch_size=16",
            "lr=0.003",
            "vlm.gradient_checkpointing=false",
            "vlm.prompt=Defect grade?",
        ],
    )


def cpu_members(quick: bool, tiny_vlm: Path) -> list[Member]:
    # Sized for 10 minutes on 2 CPU cores (measured; bench/RESULTS.md, sessions 5 and 9): Lite0 fine-tunes its
    # last two stages and head only (the frozen stem and early stages get no backward pass) at 112 px for five
    # epochs, ~52 s a fold. Five became affordable in session 9, when CPU runs stopped page-faulting their
    # largest activations (runtime.keep_freed_memory) and the batched pipeline replaced loader workers that
    # competed with the step for the two cores (fold 0, two epochs: 38.0 -> 29.2 s). Fold 0's loss for 2, 3,
    # 4, 5 epochs: 0.764, 0.784, 0.758, 0.726; the five folds' CV 0.710 (fold 0 the second worst: the choice
    # did not flatter it), the ensemble's 0.704 (0.728 with two epochs). Freezing one stage more: same fold-0
    # loss as 5 stages, 11 s a fold less; 104 px: no faster, worse. No TTA views (they multiply predictions,
    # in the bundle too): `tta: [auto, hflip]` (session 6, two epochs) took the ensemble from 0.7282 to
    # 0.7241 for 33 s. Lite0's preset fixes the flips, the demo its quarter turns (a flips probe of its own
    # cost 88 s). The MobileNetV3 trained from scratch that used to be a fourth member is gone: 119 s for no
    # ensemble gain (0.7354 with it, 0.7362 without). No random resized crop (session 19): a crop of a cell
    # labelled defective can leave its crack out, and the member's CV went from 0.7019 to 0.6774 without
    # (every fold better by 0.011-0.034, the paired difference -2.5 standard errors; `defective` rows 0.787 ->
    # 0.712), chosen by CV on the demo's folds, the test split not read.
    size, epochs = ("32", 1) if quick else ("112", 5)
    return [
        Member(
            "effnet_lite0",
            "EfficientNet-Lite0 fine-tuned from real ImageNet weights",
            "efficientnet_lite0",
            [
                f"img_size={size}",
                f"epochs={epochs}",
                "lr=0.002",
                "warmup_epochs=0.1",
                "freeze_groups=6",
                "rot90=0",
                "rrc_scale=[1.0,1.0]",
                "tta=[none]",
                "pipeline=device",
            ],
        ),
        Member(
            "probe_lite0",
            "frozen EfficientNet-Lite0 + logistic regression: the baseline",
            None,
            ["family=probe", "model=efficientnet_lite0", "pretrained=package:efficientnet_lite0", f"img_size={size}"],
        ),
        _tiny_vlm(tiny_vlm),
    ]


# GPU epochs (and size) per Lite model, chosen by 5-fold CV on these photos (one H200, sessions 6 and 7,
# bench/demo_sweep.py; bench/RESULTS.md; the held-back test split never read): Lite0 10 epochs at 300 px CV
# 0.6248, 30 epochs 0.6727 (it overfits: a longer cosine schedule's last epoch is kept), 10 epochs at 384 px
# 0.6363 and at 448 px 0.6405 (upsampling the photos does not help); Lite1 6 epochs 0.6617, 20 epochs 0.6317;
# Lite2 5 epochs 0.6873, 20 epochs 0.6525. A Lite epoch of 5 folds at 300 px takes 3-6 s there; Lite1 at 20
# epochs took 140 s of a sweep, Lite2 about as long.
GPU_EPOCHS = {0: 10, 1: 20, 2: 20}


def gpu_members(quick: bool, tiny_vlm: Path) -> list[Member]:
    # The three real ImageNet Lite weights fine-tuned whole at the photos' native 300 px; flips and rot90
    # left on auto (a short probe run decides: the cells are mostly mirror-symmetric) and tta auto chooses
    # among all eight dihedral views, cross-fitted on the OOF rows. Quick mode: 32 px, 1 epoch, the same
    # members, so the plumbing runs on a CPU.
    size = "32" if quick else "300"
    lites = [
        Member(
            f"effnet_lite{n}",
            f"EfficientNet-Lite{n} fine-tuned from real ImageNet weights, {size} px, dihedral TTA",
            "efficientnet_lite0",  # the preset's optimiser settings; model and weights overridden below
            [
                f"model=efficientnet_lite{n}",
                f"pretrained=package:efficientnet_lite{n}",
                f"img_size={size}",
                f"epochs={1 if quick else GPU_EPOCHS[n]}",
                "batch_size=64",
                "hflip=auto",
                "vflip=auto",
                "rot90=auto",
                "tta=[auto]",
            ],
        )
        for n in range(3)
    ]
    probe = Member(
        "probe_lite2",
        "frozen EfficientNet-Lite2 + logistic regression: the baseline",
        None,
        ["family=probe", "model=efficientnet_lite2", "pretrained=package:efficientnet_lite2", f"img_size={size}"],
    )
    return [*lites, probe, _tiny_vlm(tiny_vlm)]
