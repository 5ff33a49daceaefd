"""The vlm family's head mode on tiny random Qwen2.5-VL and LLaVA checkpoints, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vlm_fixtures import VLM_CLASSES, tiny_config

from kit.folds import load_folds
from kit.io import read_json
from kit.preds import load_predictions
from kit.train.driver import train_run
from kit.vlm import head as head_mode
from kit.vlm.features import encoded_batches
from kit.vlm.trainer import LoraTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
FOLD_FILES = {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "history.csv", "done.json"}


def check_run_contract(run_dir: Path, root: Path, fold_files: set[str] = FOLD_FILES) -> None:
    """Per-fold files, and oof/test predictions over all classes with rows summing to 1."""
    folds = load_folds(root)
    for f in range(folds.k):
        names = {p.name for p in (run_dir / f"fold{f}").iterdir()}
        assert names >= fold_files | {"history.csv", "done.json", "oof.npz", "test.npz"}, names
        assert "checkpoint.safetensors" not in names
    oof, test = load_predictions(run_dir / "oof.npz"), load_predictions(run_dir / "test.npz")
    assert oof.logp.shape == (len(folds.train), len(VLM_CLASSES))
    assert list(oof.ids) == folds.train["id"].tolist()
    assert (oof.fold == folds.fold_of_row).all()
    assert test.logp.shape == (len(folds.test), len(VLM_CLASSES))
    assert test.logp_folds.shape == (folds.k, len(folds.test), len(VLM_CLASSES))
    for logp in (oof.logp, test.logp):
        np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("model, pooling", [("qwen", "last"), ("llava", "mean")])
def test_head_run_writes_the_run_contract(model, pooling, tiny_qwen, tiny_llava, vlm_root, monkeypatch):
    from kit.vlm import features
    from kit.vlm.model import VisionLanguage

    encoded = []
    encode = VisionLanguage.encode_images
    monkeypatch.setattr(VisionLanguage, "encode_images", lambda vl, pixels: _count(encode(vl, pixels), encoded))
    features._RUN_CACHE.clear()
    path = tiny_qwen if model == "qwen" else tiny_llava
    cfg = tiny_config(path, f"name=head_{model}", f"vlm.pooling={pooling}")
    summary = train_run(cfg, vlm_root)
    run_dir = vlm_root / "runs" / f"head_{model}"
    check_run_contract(run_dir, vlm_root)
    # the frozen tower's output is shared by the folds: the training images go through it once for
    # training and validation together, then once more as each fold predicts its OOF rows; plus K x test
    folds = load_folds(vlm_root)
    assert len(encoded) == 2 * len(folds.train) + folds.k * len(folds.test)
    assert summary.complete and np.isfinite(summary.cv["log_loss"])
    config = read_json(run_dir / "config.json")
    assert config["vlm"]["pooling"] == pooling and config["num_classes"] == len(VLM_CLASSES)
    adapter = json.loads((run_dir / "fold0" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and "language_model" in adapter["target_modules"]


def _count(images: list, seen: list) -> list:
    seen.extend(images)
    return images


def _one_step(cfg, prompter, vl, head, paths: list[str], labels: list[int]) -> torch.Tensor:
    trainer = LoraTrainer(cfg, vl, head, CPU, steps_per_epoch=1)
    trainer.train(True)
    _, images = next(encoded_batches(vl, prompter, paths, np.arange(len(paths)), len(paths), 0))
    loss = F.cross_entropy(head_mode.logits(cfg, prompter, vl, head, images), torch.tensor(labels))
    trainer.step(loss, 0, last=True)
    trainer.train(False)
    return loss.detach()


def test_saved_adapter_and_head_predict_the_same(tiny_qwen, vlm_root, tmp_path):
    cfg = tiny_config(tiny_qwen, "lr=0.01")
    cfg.num_classes = len(VLM_CLASSES)
    paths = load_folds(vlm_root).train["path"].tolist()[:6]
    prompter, vl, head = head_mode.build(cfg, CPU)
    _one_step(cfg, prompter, vl, head, paths, [0, 1, 2, 3, 0, 1])
    assert any(p.abs().sum() > 0 for n, p in vl.trainable().items() if "lora_B" in n)  # the adapter moved
    fold_dir = tmp_path / "run" / "fold0"
    fold_dir.mkdir(parents=True)
    head_mode.save(vl, head, fold_dir)
    batches = encoded_batches(vl, prompter, paths, np.arange(len(paths)), 4, 0)
    expected = head_mode.predict_batches(cfg, prompter, vl, head, batches, CPU)
    got = head_mode.load_predictor(cfg, tmp_path / "run", 0, vlm_root)(paths)
    assert np.abs(expected - got).max() < 1e-6


def test_vision_tower_never_runs_with_gradients(tiny_qwen, vlm_root):
    cfg = tiny_config(tiny_qwen, "vlm.gradient_checkpointing=true")
    cfg.num_classes = len(VLM_CLASSES)
    prompter, vl, head = head_mode.build(cfg, CPU)
    grad_modes = []
    for module in vl.vision:
        module.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    paths = load_folds(vlm_root).train["path"].tolist()[:4]
    _one_step(cfg, prompter, vl, head, paths, [0, 1, 2, 3])
    assert grad_modes and not any(grad_modes)
    vision = [(n, p) for n, p in vl.model.named_parameters() if ".visual." in n]
    assert vision and not any(p.requires_grad or p.grad is not None for _, p in vision)
    assert not vl.core.visual.patch_embed._forward_hooks  # no input-grad hook left by peft / checkpointing
    assert not vl.language_model.get_input_embeddings()._forward_hooks
    assert any(getattr(m, "gradient_checkpointing", False) for m in vl.language_model.modules())


def test_4bit_model_trains_one_step_on_cpu(tiny_llava, vlm_root):
    cfg = tiny_config(tiny_llava, "vlm.load_in_4bit=true", "lr=0.01")
    cfg.num_classes = len(VLM_CLASSES)
    prompter, vl, head = head_mode.build(cfg, CPU)
    kinds = {type(m).__name__ for m in vl.language_model.modules()}
    assert "Linear4bit" in kinds
    assert not any(type(m).__name__ == "Linear4bit" for v in vl.vision for m in v.modules())
    paths = load_folds(vlm_root).train["path"].tolist()[:4]
    loss = _one_step(cfg, prompter, vl, head, paths, [0, 1, 2, 3])
    assert torch.isfinite(loss)
    assert any(p.abs().sum() > 0 for n, p in vl.trainable().items() if "lora_B" in n)


def test_interrupted_fold_resumes_from_its_checkpoint(tiny_llava, vlm_root):
    cfg = tiny_config(tiny_llava, "name=head_resume", "epochs=2")

    def stop_after_first_epoch(epoch: int, row: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, vlm_root, only_folds=[0], on_epoch_end=stop_after_first_epoch)
    fold_dir = vlm_root / "runs" / "head_resume" / "fold0"
    assert (fold_dir / "checkpoint.safetensors").is_file() and not (fold_dir / "done.json").exists()
    first = (fold_dir / "history.csv").read_text().splitlines()
    train_run(cfg, vlm_root, only_folds=[0])
    history = (fold_dir / "history.csv").read_text().splitlines()
    assert len(history) == 3 and history[:2] == first  # header, epoch 0 kept, epoch 1 added
    assert (fold_dir / "done.json").is_file()


def test_options_the_vlm_family_does_not_use_are_errors(tiny_qwen, vlm_root):
    from kit.errors import KitError

    with pytest.raises(KitError, match="ema_decay, mixup"):
        train_run(tiny_config(tiny_qwen, "name=head_ema", "ema_decay=0.99", "mixup=0.2"), vlm_root)


@pytest.mark.parametrize("model", ["qwen", "llava"])
def test_split_forward_matches_the_plain_transformers_forward(model, tiny_qwen, tiny_llava, vlm_root):
    """Cached image features + kit's prompt ids give the hidden states of processor(...) -> model(...):
    a plain transformers forward (e.g. in a bundle's infer.py) reproduces kit's predictions."""
    from kit.images import load_image
    from kit.vlm.inputs import Prompter, pad_right
    from kit.vlm.model import load_vlm

    cfg = tiny_config(tiny_qwen if model == "qwen" else tiny_llava)
    prompter = Prompter.load(cfg)
    vl = load_vlm(cfg, CPU, lm_head=False, trainable=False)
    vl.train(False)
    paths = load_folds(vlm_root).train["path"].tolist()[:2]
    images = [load_image(p) for p in paths]
    text = prompter.chat_text(cfg.vlm.prompt)
    plain = prompter.processor(text=[text] * 2, images=[prompter.prepare(im) for im in images], return_tensors="pt")
    _, encoded = next(encoded_batches(vl, prompter, paths, np.arange(2), 2, 0))
    ids, mask = pad_right([prompter.prompt_ids(cfg.vlm.prompt, im.features.shape[0]) for im in encoded], 0)
    assert torch.equal(ids, plain["input_ids"])
    with torch.no_grad():
        expected = vl.core(**plain).last_hidden_state
        got = vl.hidden(ids, mask, encoded)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_aligned_vision_mlp_gives_the_same_image_features(tiny_qwen, vlm_root):
    """Zero-padding the tower's MLP inner size (3420 -> 3456 in the real 3B/7B models) changes no feature."""
    from kit.vlm.inputs import Prompter
    from kit.vlm.model import align_vision_mlp, load_vlm

    cfg = tiny_config(tiny_qwen)
    paths = load_folds(vlm_root).train["path"].tolist()[:2]
    vl = load_vlm(cfg, CPU, lm_head=False, trainable=False)
    prompter = Prompter.load(cfg)
    before = next(encoded_batches(vl, prompter, paths, np.arange(2), 2, 0))[1]
    mlps = [m for m in vl.core.visual.modules() if hasattr(m, "gate_proj")]
    inner = mlps[0].gate_proj.out_features
    assert align_vision_mlp(vl.model, multiple=128, min_inner=1) == len(mlps) > 0
    assert all(m.gate_proj.out_features == m.down_proj.in_features == -(-inner // 128) * 128 for m in mlps)
    after = next(encoded_batches(vl, prompter, paths, np.arange(2), 2, 0))[1]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(b.features, a.features, atol=1e-6, rtol=1e-6)


def test_the_pixel_budget_holds_for_a_processor_saved_as_the_hub_saves_qwen(tiny_qwen, tmp_path):
    """Qwen2.5-VL's hub files keep min_pixels/max_pixels at the top of preprocessor_config.json; kit's
    vlm.min_pixels/max_pixels must win over them (a `size=` argument did not: transformers kept the file's)."""
    import shutil

    from PIL import Image

    from kit.vlm.inputs import Prompter

    hub = tmp_path / "hub-layout"
    shutil.copytree(tiny_qwen, hub)
    processor = json.loads((hub / "processor_config.json").read_text())
    files = {"image_processor": "preprocessor_config.json", "video_processor": "video_preprocessor_config.json"}
    for part, name in files.items():
        settings = processor.pop(part)
        settings.pop("size")
        (hub / name).write_text(json.dumps({**settings, "min_pixels": 56 * 56, "max_pixels": 12845056}))
    (hub / "processor_config.json").write_text(json.dumps(processor))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    budget = 4 * 56 * 56  # 12,544 pixels: 300 x 300 fits as 84 x 84 (multiples of 28), 6 x 6 patches of 14
    grid = Prompter.load(tiny_config(hub, f"vlm.min_pixels={budget}", f"vlm.max_pixels={budget}")).pixels(image)
    assert grid["image_grid_thw"].tolist() == [[1, 6, 6]]  # the file's own budget gives 22 x 22
