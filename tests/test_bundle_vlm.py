"""A bundle of a VLM head-mode run (tiny random Qwen2.5-VL): adapter + head per fold in weights/, the
base model given at run time, and the CSV of `kit submit` from infer.py with kit unimportable."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from test_bundle import assert_same_submission, bundle_data, data_dir, error_line, invoke_bundle, run_script
from vlm_fixtures import tiny_config

from kit.infer import cli as infer_cli
from kit.io import read_json
from kit.submit import write_submission
from kit.train.driver import train_run

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]
RUN = "bundle_qwen"


@pytest.fixture(scope="module")
def vlm_bundle(tiny_qwen, vlm_root) -> Path:
    assert train_run(tiny_config(tiny_qwen, f"name={RUN}"), vlm_root).complete
    result = invoke_bundle(RUN, "--root", vlm_root)
    assert result.exit_code == 0, result.output
    assert "VLM members " in result.output  # a local base model of under 2 GiB: timed for the estimate
    return vlm_root / "submissions" / f"{RUN}.bundle"


def test_vlm_bundle_holds_adapters_and_heads_not_the_base_model(vlm_bundle, tiny_qwen):
    files = set(read_json(vlm_bundle / "manifest.json")["files"])
    per_fold = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors")
    assert files == {"infer.py", "README.txt", *(f"weights/runs/{RUN}/fold{k}/{f}" for k in (0, 1) for f in per_fold)}
    readme = (vlm_bundle / "README.txt").read_text(encoding="utf-8")
    assert "--base-model DIR" in readme and f"{RUN}: {tiny_qwen}" in readme
    assert "transformers, peft" in readme
    # the first load pays one-off costs (imports, caches) that the later folds do not
    assert f"runs/{RUN}: loads " in readme and " (fold 0) + 1 x " in readme and "(tower outputs shared)" in readme


def test_vlm_bundle_csv_equals_kit_submit(vlm_bundle, vlm_root, tiny_qwen, tmp_path):
    base = tmp_path / "base model"  # copied elsewhere: the bundle uses the folder it is given
    shutil.copytree(tiny_qwen, base)
    out = tmp_path / "vlm.csv"
    images = data_dir(vlm_root) / "test"
    args = ["--images", images, "--out", out, "--base-model", f"{RUN}={base}", "--workers", "0"]
    result = run_script(vlm_bundle / "infer.py", *args, cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    assert_same_submission(out, write_submission(vlm_root, RUN).path)


def test_vlm_bundle_without_its_base_model_is_one_line_and_exit_2(vlm_bundle, vlm_root, tmp_path):
    images = data_dir(vlm_root) / "test"
    result = run_script(vlm_bundle / "infer.py", "--images", images, "--out", tmp_path / "o.csv", cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result) == (  # before anything is loaded
        f"error: {RUN}: a VLM member needs its base model: --base-model DIR (trained on tiny-qwen2.5-vl)"
    )


def test_vlm_folds_share_each_images_decode_and_tower_pass(vlm_bundle, vlm_root, tiny_qwen, tmp_path, monkeypatch):
    # in this process, decoding in it (workers 0): fold 0 decodes and encodes, fold 1 reuses its tower outputs
    import kit.vlm.inputs

    decodes: Counter = Counter()
    load = kit.vlm.inputs.load_image
    monkeypatch.setattr(kit.vlm.inputs, "load_image", lambda path: decodes.update([Path(path).name]) or load(path))
    out = tmp_path / "vlm.csv"
    images = data_dir(vlm_root) / "test"
    argv = ["--images", str(images), "--out", str(out), "--base-model", f"{RUN}={tiny_qwen}", "--workers", "0"]
    assert infer_cli.main(argv, bundle_data(vlm_bundle / "infer.py"), vlm_bundle) == 0
    assert decodes == Counter({p.name: 1 for p in images.iterdir()})  # 2 folds, each image decoded once
    assert_same_submission(out, write_submission(vlm_root, RUN).path)
