"""`kit audit NAME`: every finding about the data in one folder, audits/NAME/.

summary = audit(Path("."), "effnet_lite0")
summary.path   # audits/effnet_lite0/: label_issues.csv, confusable_pairs.csv, merge_candidates.json,
               # duplicates.csv, label_issues.png, confusable_pairs.png, duplicates.png, summary.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kit import __version__
from kit.audit.confusion import candidate_pairs, confusable_pairs, merge_candidates
from kit.audit.duplicates import ACROSS_LABELS, TRAIN_TEST, duplicate_pairs
from kit.audit.inputs import AuditInput, load_input
from kit.audit.labels import LabelIssues, label_issues
from kit.audit.sheets import Tile, write_sheet
from kit.io import staged_dir, write_json, write_text

AUDITS_DIR = "audits"
SHEET_COLUMNS = 6
PAIR_IMAGES = 3  # images of each class per confusable pair on the sheet (3 + 3 fill a row)


@dataclass
class AuditSummary:
    path: Path
    rows: int
    label_issues: int
    confusable_pairs: int
    merge_candidates: int  # candidate pairs beyond the groups already declared
    across_labels: int
    train_test: int


def _csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False, lineterminator="\n")


def issues_table(data: AuditInput, issues: LabelIssues) -> pd.DataFrame:
    train, classes = data.folds.train, data.folds.classes
    return pd.DataFrame(
        {
            "id": train["id"].to_numpy()[issues.rows],
            "path": train["path"].to_numpy()[issues.rows],
            "given_label": train["label"].to_numpy()[issues.rows],
            "suggested_label": [classes[c] for c in issues.suggested],
            "score": np.round(issues.score, 6),
        }
    )


def _issue_tiles(table: pd.DataFrame, count: int) -> list[Tile]:
    return [
        Tile(row.path, f"given: {row.given_label}\nsuggested: {row.suggested_label}\np(given) {row.score:.3f}")
        for row in table.head(count).itertuples()
    ]


def _pair_tiles(data: AuditInput, pairs: pd.DataFrame, count: int) -> list[Tile]:
    """Per pair, one row: the images of a that look most like b, then those of b that look most like a."""
    train, index = data.folds.train, {c: i for i, c in enumerate(data.folds.classes)}
    tiles = []
    for a, b in zip(pairs["class_a"].head(count), pairs["class_b"].head(count), strict=True):
        for given, other in ((a, b), (b, a)):
            rows = np.flatnonzero(data.folds.labels == index[given])
            rows = rows[np.argsort(-data.probs[rows, index[other]], kind="stable")][:PAIR_IMAGES]
            tiles += [
                Tile(train["path"].iat[r], f"{given}\np({other}) {data.probs[r, index[other]]:.2f}") for r in rows
            ]
            tiles += [Tile(None)] * (PAIR_IMAGES - len(rows))
    return tiles


def _duplicate_tiles(duplicates: pd.DataFrame, count: int) -> list[Tile]:
    tiles = []
    for row in duplicates[duplicates["kind"] == ACROSS_LABELS].head(count).itertuples():
        tiles += [
            Tile(row.path_a, f"{row.label_a}\n{row.id_a}"),
            Tile(row.path_b, f"{row.label_b}\nsimilarity {row.thumbnail_similarity:.3f}"),
        ]
    return tiles


def audit(
    root: Path = Path("."),
    name: str = "",
    min_share: float = 0.2,
    sheet_size: int = 30,
    workers: int | None = None,
) -> AuditSummary:
    """Audit a run or ensemble made from the current folds; writes audits/<name>/ as a whole folder."""
    data = load_input(Path(root), name)
    folds = data.folds
    issues = issues_table(data, label_issues(folds.labels, data.probs, folds.merge_groups))
    pairs = confusable_pairs(folds.labels, data.probs, folds.classes, folds.merge_groups)
    candidates = candidate_pairs(pairs, min_share)
    groups = merge_candidates(candidates, folds.classes, folds.merge_groups)
    duplicates = duplicate_pairs(folds, workers)
    counts = duplicates["kind"].value_counts()
    summary = AuditSummary(
        Path(root) / AUDITS_DIR / data.name,
        len(folds.train),
        len(issues),
        len(pairs),
        len(candidates),
        int(counts.get(ACROSS_LABELS, 0)),
        int(counts.get(TRAIN_TEST, 0)),
    )
    pair_rows = max(1, sheet_size // SHEET_COLUMNS)
    with staged_dir(summary.path) as out:
        write_text(out / "label_issues.csv", _csv(issues))
        write_text(out / "confusable_pairs.csv", _csv(pairs))
        write_json(out / "merge_candidates.json", groups)
        write_text(out / "duplicates.csv", _csv(duplicates))
        write_sheet(
            out / "label_issues.png",
            f"{data.name}: most suspect labels (of {len(issues)} flagged)",
            _issue_tiles(issues, sheet_size),
            SHEET_COLUMNS,
        )
        write_sheet(
            out / "confusable_pairs.png",
            f"{data.name}: most confused class pairs, one pair per row (a's images most like b | b's most like a)",
            _pair_tiles(data, pairs, pair_rows),
            SHEET_COLUMNS,
        )
        write_sheet(
            out / "duplicates.png",
            f"near-duplicate pairs with different labels (of {summary.across_labels}), side by side",
            _duplicate_tiles(duplicates, sheet_size // 2),
            SHEET_COLUMNS,
        )
        write_json(out / "summary.json", _record(data, summary, min_share))
    return summary


def _record(data: AuditInput, summary: AuditSummary, min_share: float) -> dict:
    return {
        "source": data.name,
        "kind": data.kind,
        "folds_sha256": data.folds.sha256,
        "kit_version": __version__,
        "rows": summary.rows,
        "label_issues": summary.label_issues,
        "label_issue_method": "cleanlab.filter.find_label_issues (prune_by_noise_rate), ranked by self_confidence",
        "confusable_pairs": summary.confusable_pairs,
        "merge_candidate_pairs": summary.merge_candidates,
        "merge_rule": f"confused both ways, each direction >= {min_share} of its class and >= 2 images",
        "duplicates": {ACROSS_LABELS: summary.across_labels, TRAIN_TEST: summary.train_test},
        "near_duplicate_settings": data.folds.meta.get("near_duplicates", {}),
    }
