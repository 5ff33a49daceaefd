"""kit's default recipe keeps its scores honest and fits the data: the epoch a fold predicts with is not
chosen by its own OOF rows (epoch_choice), random labels stay at log(C) through a run and an ensemble,
and training flips and crops follow from a probe of the data (hflip / vflip / rot90 / rrc_scale: auto)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import make_competition, synthetic_image

from kit.cli import main
from kit.config import TTA_VIEWS, load_config
from kit.ensemble import fit_ensemble
from kit.errors import KitError
from kit.folds import LEFT_OUT, load_folds, make_folds
from kit.infer.timm_predict import crop_views
from kit.io import read_json
from kit.metrics import log_loss
from kit.preds import load_predictions
from kit.train.driver import plan_run, run_config, train_run
from kit.train.symmetry import CROP_AREAS, SYMMETRY_FILE, decide, decide_crops, probe_folds, probe_rows_share

TINY = ["workers=0", "deterministic=true"]


# --- epoch choice ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_fold_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("recipe")
    make_folds(make_competition(base / "data", size=48), root=base / "root", k=2, workers=1)
    return base / "root"


def test_last_predicts_with_the_final_epoch_and_best_with_the_fold_s_favourite(two_fold_root):
    # one training trajectory, two ways to pick its weights: the histories are identical, and each OOF
    # score is the validation loss of the epoch it names (the plain view: tta none)
    recipe = [*TINY, "epochs=4", "tta=[none]", "lr=0.05"]
    runs = {
        choice: train_run(load_config("tiny", [*recipe, f"epoch_choice={choice}", f"name={choice}"]), two_fold_root)
        for choice in ("last", "best")
    }
    folds = load_folds(two_fold_root)
    for k in range(2):
        histories = {c: pd.read_csv(s.run_dir / f"fold{k}" / "history.csv") for c, s in runs.items()}
        np.testing.assert_allclose(histories["last"]["valid_loss"], histories["best"]["valid_loss"], atol=1e-6)
        rows = folds.fold_of_row == k
        losses = {
            c: log_loss(folds.labels[rows], load_predictions(s.run_dir / "oof.npz").probs[rows])
            for c, s in runs.items()
        }
        assert losses["last"] == pytest.approx(histories["last"]["valid_loss"].iloc[-1], abs=1e-5)
        assert losses["best"] == pytest.approx(histories["best"]["valid_loss"].min(), abs=1e-5)
    assert runs["best"].cv["log_loss"] <= runs["last"].cv["log_loss"]  # the optimism `last` gives up
    assert load_config(None).epoch_choice == "last"


def test_bad_epoch_choice_is_one_line_and_exit_2_and_patience_warns(tmp_path):
    result = CliRunner().invoke(
        main, ["train", "--model", "resnet18", "--set", "epoch_choice=worst", "--root", tmp_path]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: defaults + flags + --set: epoch_choice must be last or best"]
    result = CliRunner().invoke(main, ["train", "--model", "resnet18", "--set", "patience=3", "--root", tmp_path])
    assert result.exit_code == 2  # no folds here; the warning came first
    assert result.output.startswith("warning: patience=3: early stopping decides on the fold's own validation rows")


# --- random labels: every run's and every ensemble's CV stays at log(C) -------------------------------


def random_label_competition(root: Path, n_classes: int, n_per_class: int, seed: int) -> Path:
    """Images that say nothing about their labels: each image is tinted by a class drawn independently."""
    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(n_classes)]
    for label in classes:
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            synthetic_image(rng, int(rng.integers(n_classes)), n_classes).save(folder / f"{i:03d}.png")
    (root / "test").mkdir()
    for i in range(8):
        synthetic_image(rng, int(rng.integers(n_classes)), n_classes).save(root / "test" / f"T{i}.png")
    uniform = ",".join([f"{1 / n_classes:.6f}"] * n_classes)
    (root / "sample_submission.csv").write_text(
        ",".join(["ID", *classes]) + "\n" + "".join(f"T{i},{uniform}\n" for i in range(8)), encoding="utf-8"
    )
    return root


def test_random_labels_runs_and_their_ensemble_stay_at_log_c(tmp_path):
    n_classes = 10
    data = random_label_competition(tmp_path / "data", n_classes, 10, seed=0)
    make_folds(data, root=tmp_path, k=2, workers=1)
    # kit's defaults (tta auto, flips and crops auto, epoch_choice last) on a tiny model that can memorise its rows
    quick = ["model=test_efficientnet", "img_size=32", "epochs=3", "batch_size=10", "lr=0.01", *TINY]
    names = []
    for seed in (0, 1):
        summary = train_run(load_config(None, [*quick, f"seed={seed}", f"name=noise{seed}"]), tmp_path)
        assert summary.cv["log_loss"] >= math.log(n_classes) - 0.01, summary.cv
        assert summary.tta["cv"] == summary.cv  # the reported figure is the cross-fitted one
        decision = read_json(summary.run_dir / SYMMETRY_FILE)["decision"]
        # nothing learned, nothing decided: no flips, no crops, as a plain loop trains
        assert decision == {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0, "rrc_scale": [1.0, 1.0]}
        names.append(summary.run_dir.name)
    ensemble = fit_ensemble(tmp_path, names, "noise", method="auto", trials=4)
    for method, s in ensemble.methods.items():
        assert s["cv"]["log_loss"] >= math.log(n_classes) - 0.01, method


# --- training flips from the data ------------------------------------------------------------------------


def test_flip_decisions_from_the_probe_s_view_losses():
    prior = math.log(10)
    digits = {"none": 0.5, "hflip": 2.4, "vflip": 2.6, "rot90": 2.9, "rot270": 2.8}
    photos = {"none": 0.8, "hflip": 0.85, "vflip": 1.9, "rot90": 2.0, "rot270": 2.1}
    cells = {"none": 1.0, "hflip": 1.02, "vflip": 1.05, "rot90": 1.1, "rot270": 1.04}
    nothing = {"none": 2.2, "hflip": 2.2, "vflip": 2.2, "rot90": 2.2, "rot270": 2.2}
    assert decide(digits, prior) == {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0}
    assert decide(photos, prior) == {"hflip": 0.5, "vflip": 0.0, "rot90": 0.0}
    assert decide(cells, prior) == {"hflip": 0.5, "vflip": 0.5, "rot90": 0.5}
    assert decide(nothing, prior) == {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0}


def test_the_probe_runs_once_and_its_decision_is_the_run_s_config(two_fold_root, capsys):
    overrides = [*TINY, "epochs=4", "batch_size=4", "tta=[none]", "hflip=auto", "vflip=auto", "rot90=0", "name=flips"]
    summary = train_run(load_config("tiny", overrides), two_fold_root)
    said = capsys.readouterr().err
    announced = said.index("kit: hflip, vflip: auto, so a 3-epoch probe on 67% of fold 0's rows decides them")
    assert announced < said.index("kit: flips from a 3-epoch probe run")  # said before it runs, with how to skip it
    record = read_json(summary.run_dir / SYMMETRY_FILE)
    assert record["probe_epochs"] == 3 and set(record["views_log_loss"]) == set(TTA_VIEWS)
    assert record["decision"] == decide(record["views_log_loss"], record["prior_log_loss"])
    config = run_config(summary.run_dir)
    assert (config.hflip, config.vflip, config.rot90) == (record["decision"]["hflip"], record["decision"]["vflip"], 0)
    assert not (summary.run_dir / "symmetry_probe").exists()
    stamp = (summary.run_dir / SYMMETRY_FILE).stat().st_mtime_ns
    train_run(load_config("tiny", overrides), two_fold_root)  # the same command again: accepted, no new probe
    assert (summary.run_dir / SYMMETRY_FILE).stat().st_mtime_ns == stamp
    assert "probe" not in capsys.readouterr().err


def test_a_short_run_s_probe_takes_a_stratified_share_of_fold_0(two_fold_root):
    assert probe_rows_share(15, 5) == 1.0  # the hidden case: 3 probe epochs of 75 fold-epochs, all rows
    assert probe_rows_share(2, 1) == 0.25  # bench_e2e case (b): one fold of 2 epochs, the probe as long
    folds = load_folds(two_fold_root)
    assert probe_folds(folds, 1.0, 0) is folds
    thinned = probe_folds(folds, 0.5, 0)
    before, after = folds.fold_of_row, thinned.fold_of_row
    assert set(np.unique(after)) == {LEFT_OUT, 0, 1} and (after[after != LEFT_OUT] == before[after != LEFT_OUT]).all()
    for part in (before == 0, before != 0):  # each part keeps half of every class
        for label in np.unique(folds.labels):
            rows = part & (folds.labels == label)
            assert (rows & (after != LEFT_OUT)).sum() == round(0.5 * rows.sum())
    assert (probe_folds(folds, 0.5, 0).fold_of_row == after).all()  # the run's seed decides, nothing else
    assert thinned.train["path"].tolist() == folds.train["path"].tolist()  # the image cache stays the run's


def test_one_fold_of_a_short_run_probes_a_third_of_its_rows(two_fold_root, capsys):
    overrides = [*TINY, "epochs=4", "batch_size=4", "tta=[none]", "hflip=auto", "rot90=0", "vflip=0", "name=short"]
    cfg = load_config("tiny", overrides)
    summary = train_run(cfg, two_fold_root, only_folds=[0])
    assert "kit: hflip: auto, so a 3-epoch probe on 33% of fold 0's rows decides it" in capsys.readouterr().err
    record = read_json(summary.run_dir / SYMMETRY_FILE)
    assert record["rows_share"] == round(1 / 3, 4)  # a quarter of 4 fold-epochs, over the probe's 3
    kept = probe_folds(load_folds(two_fold_root), probe_rows_share(4, 1), cfg.seed).fold_of_row
    assert record["probe_rows"] == {"train": int((kept == 1).sum()), "valid": int((kept == 0).sum())}
    assert record["decision"] == decide(record["views_log_loss"], record["prior_log_loss"])
    train_run(load_config("tiny", overrides), two_fold_root, only_folds=[1])  # the run's other fold: same decision
    assert read_json(summary.run_dir / SYMMETRY_FILE) == record
    assert run_config(summary.run_dir).hflip == record["decision"]["hflip"]


def _crop_losses(none: float, kept: dict[float, float], prior: float) -> dict[str, float]:
    """View losses whose five crops of each area keep `kept[area]` of what a probe learned over the prior."""
    losses = {"none": none}
    for area, share in kept.items():
        losses.update(dict.fromkeys(crop_views(area), none + (1 - share) * (prior - none)))
    return losses


def test_crops_are_kept_down_to_the_smallest_area_whose_crops_keep_what_the_probe_learned():
    # the kept shares of 3-epoch probes trained without crops (session 19): rendered digits, where [0.75, 1]
    # crops beat none, and the elpv cells, where none beat [0.6, 1]
    digits = _crop_losses(1.073, {0.35: 0.078, 0.6: 0.739, 0.75: 0.897}, prior=2.302)
    cells = _crop_losses(0.681, {0.35: -0.334, 0.6: 0.460, 0.75: 0.646}, prior=1.049)
    photos = _crop_losses(0.8, {0.35: 0.85, 0.6: 0.95, 0.75: 0.97}, prior=2.0)
    assert decide_crops(digits, 2.302) == [0.75, 1.0]
    assert decide_crops(cells, 1.049) == [1.0, 1.0]  # no crop
    assert decide_crops(photos, 2.0) == [0.35, 1.0]
    assert decide_crops(_crop_losses(2.2, dict.fromkeys(CROP_AREAS, 1.0), 2.2), 2.2) == [1.0, 1.0]  # learned nothing


def test_a_crop_view_is_that_part_of_the_image_resized_back_to_the_whole():
    import torch

    from kit.infer.timm_predict import tta_logp

    class AsIs:  # a Normalizer that leaves the batch as it is (the views act on normalised batches)
        channels_last = False

        def __call__(self, images):
            return images

    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()

    def probs(name: str, images: torch.Tensor = x) -> torch.Tensor:
        return tta_logp(model, images, AsIs(), [name], "fp32").exp()

    assert crop_views(0.25) == ["crop0.25:tl", "crop0.25:tr", "crop0.25:bl", "crop0.25:br", "crop0.25:c"]
    quarter = torch.nn.functional.interpolate(x[:, :, 4:, :4], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probs("crop0.25:bl"), probs("none", quarter))  # the bottom-left quarter
    torch.testing.assert_close(probs("crop1:c"), probs("none"))  # the whole image
    torch.testing.assert_close(probs("crop0.25:tl").sum(1), torch.ones(2))


def test_rrc_scale_auto_is_decided_by_the_probe_and_recorded(two_fold_root, capsys):
    overrides = [*TINY, "epochs=4", "batch_size=4", "tta=[none]", "hflip=0.5", "vflip=0", "rot90=0"]
    summary = train_run(load_config("tiny", [*overrides, "rrc_scale=auto", "name=crops"]), two_fold_root)
    said = capsys.readouterr().err
    assert "kit: rrc_scale: auto, so a 3-epoch probe on 67% of fold 0's rows decides it" in said
    decided = next(line for line in said.splitlines() if line.startswith("kit: crops from a 3-epoch probe run"))
    assert "rrc_scale [" in decided and "hflip" not in decided  # what was decided, not the flips the user set
    record = read_json(summary.run_dir / SYMMETRY_FILE)
    assert record["recipe"]["rrc_scale"] == [1.0, 1.0]  # the probe trains without crops (and flips)
    assert {v for a in CROP_AREAS for v in crop_views(a)} <= set(record["views_log_loss"])
    assert record["decision"]["rrc_scale"] == decide_crops(record["views_log_loss"], record["prior_log_loss"])
    config = run_config(summary.run_dir)
    assert config.rrc_scale == record["decision"]["rrc_scale"] and config.hflip == 0.5  # a set flip stays
    # a probe of the same recipe that decided flips alone (crops fixed at [1, 1]) is run again for the crops
    flips_only = [*TINY, "epochs=4", "batch_size=4", "tta=[none]", "hflip=auto", "vflip=0", "rot90=0", "name=again"]
    train_run(load_config("tiny", [*flips_only, "rrc_scale=[1.0,1.0]"]), two_fold_root, only_folds=[0])
    assert "rrc_scale" not in read_json(two_fold_root / "runs" / "again" / SYMMETRY_FILE)["decision"]
    plan = plan_run(load_config("tiny", [*flips_only, "rrc_scale=auto"]), two_fold_root, only_folds=[0])
    assert plan.cfg.rrc_scale == read_json(plan.run_dir / SYMMETRY_FILE)["decision"]["rrc_scale"]
    with pytest.raises(KitError, match="rrc_scale: \\[min, max\\] in \\(0, 1\\], or auto"):
        load_config("tiny", ["rrc_scale=sometimes"])


def test_bad_flip_values_are_named():
    with pytest.raises(KitError, match="hflip, vflip, rot90 \\(each also auto\\)"):
        load_config(None, ["hflip=sometimes"])
    with pytest.raises(KitError, match="hflip, vflip, rot90"):
        load_config(None, ["rot90=2"])


def test_on_rendered_digits_kit_keeps_the_plain_view_and_trains_without_flips(tmp_path):
    # the quick version of bench/bench_recipe.py: orientation-sensitive photos, kit's defaults
    from kit.demo.digits import materialise_digits

    data = materialise_digits(tmp_path / "digits", limit=500)
    make_folds(data.data_dir, root=tmp_path, k=2, workers=1)
    quick = {"model": "resnet10t", "img_size": 32, "epochs": 8}
    cfg = load_config(None, ["workers=0", "deterministic=true", "name=digits"], quick)
    assert (cfg.lr, cfg.rrc_scale, cfg.tta, cfg.epoch_choice) == (0.003, "auto", ["auto"], "last")
    summary = train_run(cfg, tmp_path)
    decision = read_json(summary.run_dir / SYMMETRY_FILE)["decision"]
    # crops as the probe found (here, 500 digits at 32 px: none, as fold 0 of the session-5 table preferred)
    assert decision == {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0, "rrc_scale": decision["rrc_scale"]}
    assert run_config(summary.run_dir).rrc_scale == decision["rrc_scale"]
    assert decision["rrc_scale"] in ([0.35, 1.0], [0.6, 1.0], [0.75, 1.0], [1.0, 1.0])
    assert summary.cv["log_loss"] < 2.0  # it learned
    views = summary.tta["per_view_log_loss"]
    for view in ("hflip", "vflip", "rot90", "rot270", "transpose", "transverse"):
        assert views[view] > views["none"] + 0.2, view  # a mirrored or turned digit is another digit or none
        assert view not in summary.tta["views"], view  # so the test-time average leaves it out
    # (rot180 may join: 0, 1 and 8 read the same upside down, and a weak model gains from the average)
