"""Session fixtures of the vlm and probe tests (registered through tests/conftest.py).

Tiny random Qwen2.5-VL and LLaVA checkpoints are built once per test session and saved with
`save_pretrained`, so every test loads them from a directory as it would a real model; one small
4-class competition with 2 folds is shared by the runs (each test uses its own run name).
"""

from __future__ import annotations

from pathlib import Path

import pytest

VLM_CLASSES = ("cat", "dog", "bird", "fish")
TINY_SETTINGS = ["workers=0", "device=cpu"]  # on top of kit.vlm.tiny.TINY_VLM_SETTINGS


def tiny_config(model: Path, *overrides: str):
    """A vlm config for the tiny models: one epoch, 4 image tokens, CPU."""
    from kit.config import load_config
    from kit.vlm.tiny import TINY_VLM_SETTINGS

    return load_config(None, [f"model={model}", *TINY_VLM_SETTINGS, *TINY_SETTINGS, *overrides])


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    from kit.vlm.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from kit.vlm.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def vlm_root(tmp_path_factory) -> Path:
    """A 4-class competition (4 images per class, 4 test images) with 2 folds."""
    from conftest import make_competition

    from kit.folds import make_folds

    root = tmp_path_factory.mktemp("vlm_root")
    data = make_competition(root / "data", classes=VLM_CLASSES, n_per_class=4, n_test=4)
    make_folds(data, root=root, k=2, workers=1)
    return root


@pytest.fixture
def single_thread():
    """One torch thread: the tiny models gain nothing from two, and on a busy 2-core machine two
    threads per process spin against each other (a 4x slower suite was measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
