"""The `kit` command line: parses options, calls one function, prints one closing line.

Heavy libraries (torch, timm, transformers) are imported inside the commands that need them, so
`kit --help`, `kit folds` and `kit submit` start in a fraction of a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kit.bundle.command import bundle as bundle_command
from kit.ensemble.command import ensemble as ensemble_command
from kit.errors import KitError
from kit.infer.progress import logged_bars
from kit.options import ROOT
from kit.tune.command import tune as tune_command


class KitGroup(click.Group):
    """Turns a KitError anywhere below into one line on stderr and exit code 2, and Ctrl-C (SIGINT) into
    one line and exit code 130: every artifact is written atomically, so what is on disk is whole."""

    def invoke(self, ctx: click.Context):
        try:
            with logged_bars():  # a log file gets a progress line every few seconds, not every redraw
                return super().invoke(ctx)
        except KitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo(err=True)  # end the progress bar's line
            click.echo(
                "interrupted: every file written so far is complete; run the same command again to go on "
                "(kit train resumes from the last finished epoch)",
                err=True,
            )
            sys.exit(130)


@click.group(cls=KitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kit")
def main() -> None:
    """kit: folds, fold training, honest OOF ensembles, submissions and offline bundles."""


@main.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("-k", "--folds", "k", default=5, show_default=True, help="Number of folds.")
@click.option("--seed", default=42, show_default=True)
@click.option("--layout", type=click.Choice(["dacon", "kaggle"]), help="Override the detected layout.")
@click.option(
    "--sample", type=click.Path(path_type=Path), help="Sample submission (default DATA_DIR/sample_submission.csv)."
)
@click.option(
    "--train-csv", type=click.Path(path_type=Path), help="Kaggle training table (default DATA_DIR/train.csv)."
)
@click.option(
    "--test-csv", type=click.Path(path_type=Path), help="Test id -> file table (default DATA_DIR/test.csv if present)."
)
@click.option("--train-dir", type=click.Path(path_type=Path), help="Training image folder.")
@click.option("--test-dir", type=click.Path(path_type=Path), help="Test image folder.")
@click.option("--id-col", help="Column of train.csv holding the image id or file name.")
@click.option("--label-col", help="Column of train.csv holding the class name.")
@click.option(
    "--merge-classes",
    type=click.Path(path_type=Path),
    help='JSON list of classes the organisers declared identical: [["a", "b"], ...].',
)
@click.option("--skip-bad", is_flag=True, help="Drop unreadable training images (and list them) instead of stopping.")
@click.option(
    "--max-distance",
    default=8,
    show_default=True,
    help="Largest perceptual-hash Hamming distance (of 64 bits) that proposes a near-duplicate pair.",
)
@click.option(
    "--min-similarity",
    default=0.99,
    show_default=True,
    help="Thumbnail correlation that confirms a hash match as a near-duplicate.",
)
@click.option("--workers", type=int, help="Processes decoding images (default: all cores).")
@click.option(
    "--exclude",
    type=click.Path(path_type=Path),
    help="CSV with an id column (e.g. an edited audits/NAME/label_issues.csv): training images to leave out.",
)
@ROOT
def folds(
    data_dir,
    k,
    seed,
    layout,
    sample,
    train_csv,
    test_csv,
    train_dir,
    test_dir,
    id_col,
    label_col,
    merge_classes,
    skip_bad,
    max_distance,
    min_similarity,
    workers,
    exclude,
    root,
) -> None:
    """Make stratified, de-duplicated K folds.

    Reads DATA_DIR (Dacon or Kaggle layout), decodes every image once, groups near-duplicates so they
    share a fold and writes folds/train.csv, folds/test.csv and folds/classes.json.
    """
    from kit.data import LayoutOptions
    from kit.folds import make_folds

    options = LayoutOptions(layout, sample, train_csv, test_csv, train_dir, test_dir, id_col, label_col)
    s = make_folds(
        data_dir, root, k, seed, options, merge_classes, skip_bad, max_distance, min_similarity, workers, exclude
    )
    for line in s.skipped:
        click.echo(f"skipped: {line}", err=True)
    if s.duplicate_pairs_train_test:
        click.echo(
            f"warning: {s.duplicate_pairs_train_test} near-duplicate pairs between train and test "
            "(leakage: those test images have a twin in train)",
            err=True,
        )
    if s.small_classes:
        click.echo(
            f"warning: {len(s.small_classes)} classes have fewer than {k} images "
            f"(e.g. {s.small_classes[0]!r}); some folds will not see them",
            err=True,
        )
    click.echo(
        f"wrote {root / 'folds'}: {s.n_train} train rows in {s.k} folds, {s.n_test} test rows, "
        f"{s.n_groups} groups ({s.duplicate_pairs_train} near-duplicate pairs in train), "
        + (f"{len(s.excluded)} excluded (--exclude), " if s.excluded else "")
        + f"sha256 {s.sha256[:12]}"
    )


@main.command()
@click.argument("name")
@click.option("--out", type=click.Path(path_type=Path), help="CSV to write (default submissions/NAME.csv).")
@ROOT
def submit(name, out, root) -> None:
    """Write submissions/NAME.csv from a run or ensemble.

    NAME is a run (runs/NAME) or an ensemble (ensembles/NAME) made from the current folds.
    """
    from kit.submit import write_submission

    s = write_submission(root, name, out)
    click.echo(f"wrote {s.path}: {s.rows} rows x {s.columns} classes")


@main.command("check-submission")
@click.argument("csv_file", type=click.Path(path_type=Path))
@click.option("--sample", type=click.Path(path_type=Path), required=True, help="The organisers' sample submission.")
def check_submission_command(csv_file, sample) -> None:
    """Validate a CSV against the sample submission.

    Checks the header and its order, the ids and their order, NaN/inf, values in [0, 1] and row sums.
    """
    from kit.submit import check_submission

    s = check_submission(csv_file, sample)
    click.echo(f"ok {s.path}: {s.rows} rows x {s.columns} classes match {sample}")


@main.command()
@click.argument("preset_or_config", required=False)
@click.option("--model", help="Any timm model name (or vlm:PATH_OR_HUB_ID).")
@click.option("--img-size", type=int, help="Training and prediction resolution.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--name", help="Run folder under runs/ (default: from the preset or model).")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--fold", "only_folds", type=int, multiple=True, help="Train only these folds (repeatable).")
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    help="Folds in parallel: N workers, one GPU each (N CPU workers without CUDA), each taking the next fold.",
)
@click.option(
    "--ddp",
    type=click.IntRange(min=1),
    help="Each fold data-parallel over N GPUs through torchrun (N CPU processes without CUDA).",
)
@click.option("--head", type=click.Choice(["head", "rerank", "probe"]), help="vlm: how the VLM classifies.")
@click.option("--base-run", help="vlm rerank: the run whose top-k classes are re-scored.")
@click.option("--top-k", type=int, help="vlm rerank: candidates per image.")
@click.option("--lora-r", type=int, help="vlm: LoRA rank.")
@click.option("--4bit", "four_bit", is_flag=True, default=None, help="vlm: 4-bit nf4 QLoRA (bitsandbytes).")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Any config key, e.g. --set ema_decay=0.999."
)
@ROOT
def train(
    preset_or_config,
    model,
    img_size,
    epochs,
    batch_size,
    lr,
    name,
    device,
    only_folds,
    gpus,
    ddp,
    head,
    base_run,
    top_k,
    lora_r,
    four_bit,
    overrides,
    root,
) -> None:
    """Train a model on every fold (resumable).

    PRESET_OR_CONFIG is a shipped preset (see `kit presets`) or a YAML file; quick flags and --set
    override it. Writes runs/NAME/ with fold weights, oof.npz and test.npz.
    """
    from kit.config import cautions, load_config
    from kit.train.driver import train_run

    quick = {
        "img_size": img_size,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "name": name,
        "device": device,
        "vlm.head": head,
        "vlm.base_run": base_run,
        "vlm.top_k": top_k,
        "vlm.lora_r": lora_r,
        "vlm.load_in_4bit": four_bit,
    }
    if model:
        family, _, target = model.partition(":") if model.startswith(("vlm:", "probe:")) else ("timm", "", model)
        quick.update(family=family, model=target)
    cfg = load_config(preset_or_config, list(overrides), quick)
    for note in cautions(cfg):
        click.echo(f"warning: {note}", err=True)
    if gpus and ddp:
        raise click.UsageError("--gpus and --ddp: choose one (folds in parallel, or each fold over several GPUs)")
    if gpus:
        from kit.train.parallel import train_parallel

        s = train_parallel(cfg, root, list(only_folds) or None, gpus)
    elif ddp:
        from kit.train.ddp import train_ddp

        s = train_ddp(cfg, root, list(only_folds) or None, ddp)
    else:
        s = train_run(cfg, root, list(only_folds) or None)
    if s.complete:
        tta = ""
        if s.tta:  # tta: auto: the figure with the chosen views is cross-fitted; the plain view's beside it
            tta = f" (TTA {'+'.join(s.tta['views'])}, cross-fitted; {s.tta['cv_none']['log_loss']:.4f} with none alone)"
        click.echo(
            f"wrote {s.run_dir}: {s.k} folds, CV log loss {s.cv['log_loss']:.4f}{tta}, accuracy {s.cv['accuracy']:.4f}"
        )
    else:
        click.echo(f"wrote {s.run_dir}: folds {s.folds_done} of {s.k} done; train the rest to get oof.npz")


@main.command()
def presets() -> None:
    """List the shipped training presets."""
    from kit.config import PRESETS_DIR, list_presets, read_yaml

    for name in list_presets():
        data = read_yaml(PRESETS_DIR / f"{name}.yaml")
        click.echo(f"{name:24s} {data.get('model', '')} @ {data.get('img_size', 'model default')} px")


@main.command()
@click.argument("run")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="CSV of probabilities to write.")
@ROOT
def predict(run, images, out, root) -> None:
    """Predict a folder of images with a run's fold models."""
    from kit.predict import predict_folder

    s = predict_folder(root, run, images, out)
    click.echo(f"wrote {s.path}: {s.rows} images x {s.columns} classes ({s.models} fold models, TTA {s.tta})")


@main.command()
@click.argument("preset_or_config", required=False, default="tiny")
@click.option("--model", help="Any timm model name.")
@click.option("--img-size", type=int)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=30, show_default=True, help="Timed steps per loop (after warm-up).")
@click.option("--compile/--eager", "compiled", default=False, help="torch.compile both loops.")
@click.option("--images", type=int, default=0, help="Also time the input pipeline on this many JPEG files.")
@click.option("--device")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@ROOT
def bench(preset_or_config, model, img_size, batch_size, steps, compiled, images, device, overrides, root) -> None:
    """Time kit's training step against a hand-written loop.

    Same process, device, model, batch, precision and memory format; prints images/s, peak memory,
    MFU where known and the ratio. With --images N, also the share of time waiting for data.
    """
    from kit.bench import bench_input_pipeline, bench_training, format_rows, write_jpegs
    from kit.config import load_config

    quick = {"model": model, "img_size": img_size, "device": device, "compile": compiled or None}
    cfg = load_config(preset_or_config, list(overrides), quick)
    rows = bench_training(cfg, batch_size, steps)
    click.echo(format_rows(rows))
    if images:
        paths = write_jpegs(root / ".cache" / "bench_jpegs", images)
        cfg.img_size = cfg.img_size or 224
        click.echo(format_rows(bench_input_pipeline(cfg, paths, batch_size, root / ".cache" / "images")))
    click.echo(
        f"kit / reference: {rows[0]['ratio_vs_reference']:.3f} ({rows[0]['images_per_s']} vs "
        f"{rows[1]['images_per_s']} img/s)"
    )


@main.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo"),
    show_default=True,
    help="Folder for the demo's data, folds, runs, ensembles and submissions.",
)
@click.option("--quick", is_flag=True, help="A small subset and small models: proves every stage in minutes.")
@click.option(
    "--recipe",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="Members sized for 2 CPU cores (cpu) or one GPU (gpu); auto: gpu when CUDA is available.",
)
def demo(root, quick, recipe) -> None:
    """Run the whole pipeline on real solar-cell photos.

    Materialises the elpv-dataset photos (installed by the demo extra) as a Dacon contest, makes 5
    folds, trains the recipe's members, ensembles, submits, bundles, runs the bundle offline and prints
    one table. cpu: fine-tuned EfficientNet-Lite0, a frozen-feature probe and a tiny VLM
    pipeline check. gpu: EfficientNet-Lite0/1/2 fine-tuned at 300 px with dihedral TTA (the lite1/lite2
    weights come from the gpu-demo extra), a probe on Lite2 and the tiny VLM.
    """
    from kit.demo.pipeline import format_report, run_demo

    report = run_demo(root, quick, log=lambda line: click.echo(line, err=True), recipe=recipe)
    click.echo(format_report(report))
    click.echo(
        f"wrote {root}: submission {root / 'submissions' / 'demo.csv'}, "
        f"test-split log loss {report.test_split['log_loss']:.4f}"
    )


@main.command()
@click.argument("name")
@click.option(
    "--min-share",
    default=0.2,
    show_default=True,
    help="A merge candidate is confused both ways, each way at least this share of its class's images.",
)
@click.option("--sheet-size", default=30, show_default=True, help="Images on each contact sheet.")
@click.option("--workers", type=int, help="Processes decoding images for the near-duplicate check (default: all).")
@ROOT
def audit(name, min_share, sheet_size, workers, root) -> None:
    """Find suspect labels, confusable classes and near-duplicates from a run's or ensemble's OOF.

    NAME is a run or an ensemble made from the current folds. Writes audits/NAME/: label_issues.csv
    (cleanlab, most suspect first), confusable_pairs.csv, merge_candidates.json (for kit folds
    --merge-classes), duplicates.csv (twins across labels and across train/test) and contact sheets.
    Drop suspect images with kit folds --exclude audits/NAME/label_issues.csv (edited to the rows to drop).
    """
    from kit.audit import audit as run_audit

    s = run_audit(root, name, min_share, sheet_size, workers)
    click.echo(
        f"wrote {s.path}: {s.label_issues} suspect labels of {s.rows} images, {s.confusable_pairs} confusable "
        f"class pairs ({s.merge_candidates} merge candidates), {s.across_labels} near-duplicate pairs across "
        f"labels, {s.train_test} train/test"
    )


@main.command("runs")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list of objects.")
@ROOT
def runs_command(as_json, root) -> None:
    """List every run and ensemble, best CV log loss first.

    Name, family, model, image size, epochs, folds done / K, CV log loss and accuracy, wall time, date and
    the config keys that differ from the run's preset; runs made from other folds are marked stale.
    """
    import json

    from kit.runs_table import format_table, list_runs

    rows = list_runs(root)
    if as_json:
        click.echo(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    click.echo(format_table(rows))
    n_runs = sum(r["kind"] == "run" for r in rows)
    stale = sum(r["stale"] for r in rows)
    click.echo(f"{n_runs} runs and {len(rows) - n_runs} ensembles under {root} ({stale} stale)")


# Stages that live in their own packages bring their own command; only click loads at start-up.
main.add_command(ensemble_command)
main.add_command(bundle_command)
main.add_command(tune_command)

if __name__ == "__main__":
    main()
