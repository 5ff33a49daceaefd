"""The model-family registry. A family is a module with three functions:

    resolve_config(cfg, folds) -> TrainConfig          fill model-derived fields (input size, mean, ...)
    fit_fold(cfg, folds, fold, fold_dir, root, on_epoch_end=None)   train; resume from fold_dir; may return
        the kept weights' logp of the validation rows when its loop already predicted them (else None)
    load_predictor(cfg, run_dir, fold, root) -> predict(paths) -> logp [N, C]

and, where it can predict several test-time views (`tta: auto`, the timm family), a fourth:

    load_view_predictor(cfg, run_dir, fold, root) -> predict(paths, views) -> logp [V, N, C]

Families are imported only when used, so `kit --help` never pays for torch or transformers.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kit.errors import KitError

FAMILIES = {
    "timm": "kit.train.timm_family",
    "vlm": "kit.vlm.family",
    "probe": "kit.probe.family",
}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise KitError(f"family {name!r}: expected one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
