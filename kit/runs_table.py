"""`kit runs`: one table of every run and ensemble under a project, best CV log loss first.

    rows = list_runs(Path("."))        # one dict per run or ensemble (what `kit runs --json` prints)
    print(format_table(rows))

A run is any folder under runs/ holding a config.json (so `kit tune`'s trial runs, one level deeper,
are listed too); an ensemble is a folder under ensembles/ holding a recipe.json. A run or ensemble made
from other folds than folds/ now holds is marked stale, not refused: this is a listing. `changes` are
the config keys that differ from the run's preset (the shipped preset of the run's name, else the one
with its model, else kit's defaults), leaving out what kit resolves from the model and the folds.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from kit.config import PRESETS_DIR, RESUME_SAFE_KEYS, RUN_RECORD_KEYS, list_presets, load_config, read_yaml, to_dict
from kit.errors import KitError
from kit.io import read_json
from kit.preds import ENSEMBLES_DIR, RUNS_DIR

# filled in by kit from the model and the folds when the preset leaves them empty: not a user's choice
RESOLVED_KEYS = {"name", "num_classes", "mean", "std", "img_size"}
SHOWN_KEYS = {"family", "model"}  # columns of the table already


def _read(path: Path) -> dict:
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise KitError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise KitError(f"{path}: expected a JSON object")
    return data


def _current_folds(root: Path) -> dict | None:
    path = root / "folds" / "classes.json"
    return _read(path) if path.is_file() else None


def _date(paths: list[Path]) -> str:
    stamp = max(p.stat().st_mtime for p in paths if p.is_file())
    return dt.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def preset_of(config: dict) -> str | None:
    """The preset a run most likely started from; None for kit's defaults."""
    presets = list_presets()
    if config.get("name") in presets:
        return config["name"]
    for name in presets:
        data = read_yaml(PRESETS_DIR / f"{name}.yaml")
        if data.get("model") == config.get("model") and data.get("family", "timm") == config.get("family", "timm"):
            return name
    return None


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(config: dict, preset: str | None) -> list[str]:
    """`key=value` for every setting of the run that its preset (or kit's defaults) sets otherwise."""
    base = _flat(to_dict(load_config(preset)))
    mine = _flat({k: v for k, v in config.items() if k not in RUN_RECORD_KEYS})
    changes = []
    for key in sorted(mine):
        if key in RESUME_SAFE_KEYS or key in SHOWN_KEYS:
            continue
        if key in RESOLVED_KEYS and base.get(key) in (0, [], "", None):
            continue
        if key in base and mine[key] != base[key]:
            changes.append(f"{key}={_setting(mine[key])}")
    return changes


def _setting(value: Any) -> str:
    """A value as `--set` takes it: lists as [a,b]."""
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)


def _stale(record: dict, folds: dict | None) -> bool:
    if folds is None:
        return False  # no folds/ to compare with: nothing says it is stale
    classes = record.get("classes")
    return record.get("folds_sha256") != folds["train_sha256"] or (classes is not None and classes != folds["classes"])


def run_row(run_dir: Path, name: str, folds: dict | None) -> dict:
    config = _read(run_dir / "config.json")
    done_files = sorted(run_dir.glob("fold*/done.json"))
    done = [_read(p) for p in done_files]
    scores_file = run_dir / "scores.json"
    cv = _read(scores_file).get("cv", {}) if scores_file.is_file() else {}
    stale = _stale(config, folds)
    preset = preset_of(config)
    return {
        "name": name,
        "kind": "run",
        "family": config.get("family", "timm"),
        "model": config.get("model", ""),
        "img_size": config.get("img_size"),
        "epochs": config.get("epochs"),
        "folds_done": len(done),
        "k": None if stale or folds is None else folds["k"],
        "cv_log_loss": cv.get("log_loss"),
        "cv_accuracy": cv.get("accuracy"),
        "seconds": round(sum(float(d.get("seconds", 0)) for d in done), 1),
        "date": _date([run_dir / "config.json", scores_file, *done_files]),
        "stale": stale,
        "preset": preset,
        "changes": config_changes(config, preset),
    }


def ensemble_row(path: Path, folds: dict | None) -> dict:
    recipe = _read(path / "recipe.json")
    cv = recipe.get("scores", {}).get("ensemble", {}).get("cv", {})
    per_fold = recipe.get("scores", {}).get("ensemble", {}).get("cv_per_fold") or []
    members = list(recipe.get("members", []))
    return {
        "name": path.name,
        "kind": "ensemble",
        "family": "ensemble",
        "model": f"{recipe.get('method', '?')} of {len(members)}",
        "img_size": None,
        "epochs": None,
        "folds_done": len(per_fold),
        "k": len(per_fold) or None,
        "cv_log_loss": recipe.get("cv_log_loss", cv.get("log_loss")),
        "cv_accuracy": cv.get("accuracy"),
        "seconds": recipe.get("fit", {}).get("seconds"),
        "date": _date([path / "recipe.json"]),
        "stale": _stale(recipe, folds),
        "members": members,
        "changes": [],
    }


def run_dirs(root: Path) -> list[tuple[str, Path]]:
    """(name, folder) of every run under runs/, a run inside another never counted twice."""
    base = root / RUNS_DIR
    found: list[tuple[str, Path]] = []
    for config in sorted(base.rglob("config.json")) if base.is_dir() else []:
        folder = config.parent
        if any(folder.is_relative_to(other) for _, other in found):
            continue  # a file of a run's own (a model folder kept inside it)
        found.append((folder.relative_to(base).as_posix(), folder))
    return found


def list_runs(root: Path = Path(".")) -> list[dict]:
    root = Path(root)
    folds = _current_folds(root)
    rows = [run_row(path, name, folds) for name, path in run_dirs(root)]
    ensembles = root / ENSEMBLES_DIR
    if ensembles.is_dir():
        rows += [ensemble_row(p.parent, folds) for p in sorted(ensembles.glob("*/recipe.json"))]
    # best first; runs without a CV figure yet (unfinished) at the end, by name
    return sorted(rows, key=lambda r: (r["cv_log_loss"] is None, r["cv_log_loss"] or 0.0, r["name"]))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _cell(value, fmt: str = "") -> str:
    return "" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    header = ("name", "family", "model", "img", "epochs", "folds", "CV log loss", "CV acc", "wall", "date", "changes")
    cells = []
    for r in rows:
        folds = f"{r['folds_done']}/{_cell(r['k']) or '?'}"
        notes = r["changes"] if r["kind"] == "run" else [f"members: {', '.join(r['members'])}"]
        cells.append(
            (
                r["name"] + (" *" if r["stale"] else ""),
                r["family"],
                r["model"],
                _cell(r["img_size"]),
                _cell(r["epochs"]),
                folds,
                _cell(r["cv_log_loss"], ".4f"),
                _cell(r["cv_accuracy"], ".4f"),
                _duration(r["seconds"]),
                r["date"],
                " ".join(notes),
            )
        )
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header[:-1])]
    numeric = {3, 4, 6, 7, 8}  # right-aligned columns
    lines = []
    for row in [header, *cells]:
        parts = [v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=False))]
        lines.append("  ".join([*parts, row[-1]]).rstrip())
    if any(r["stale"] for r in rows):
        lines.append("* stale: made from other folds than folds/ holds now (kit ensemble and kit submit refuse it)")
    return "\n".join(lines)
