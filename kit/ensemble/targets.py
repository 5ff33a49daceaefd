"""Which columns count as the true class: the label and the classes the organisers declared identical.

    eq = Equivalents.from_groups(folds.merge_groups, n_classes)
    cols, valid = eq.columns(labels)   # [N, G] the columns whose probability is the true class's

The metric merges such classes before scoring (`kit.metrics.merge_equivalent`), so every objective the
ensemble optimises does the same: a row's loss is -log of the summed probability of its label's group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Equivalents:
    group_of: np.ndarray  # [C] group id of each class (a class alone is its own group)
    members: np.ndarray  # [C, G] the classes of each class's group, padded with -1

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[int]], n_classes: int) -> Equivalents:
        group_of = np.arange(n_classes)
        for group in groups:
            group_of[list(group)] = group[0]
        width = max([len(g) for g in groups], default=1)
        members = np.full((n_classes, width), -1, dtype=np.int64)
        members[:, 0] = np.arange(n_classes)
        for group in groups:
            for c in group:
                members[c, : len(group)] = sorted(group)
        return cls(group_of, members)

    def columns(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols = self.members[np.asarray(labels)]
        valid = cols >= 0
        return np.where(valid, cols, np.asarray(labels)[:, None]), valid

    def is_target(self, cols: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.group_of[cols] == self.group_of[np.asarray(labels)][:, None]


def target_logp(logp, labels, equivalents: Equivalents):
    """Log of the true class's (merged) probability per row, for a torch tensor logp [N, C]."""
    import torch

    cols, valid = equivalents.columns(np.asarray(labels))
    picked = logp.gather(1, torch.as_tensor(cols, device=logp.device))
    if valid.all():
        return picked[:, 0] if cols.shape[1] == 1 else torch.logsumexp(picked, dim=1)
    mask = torch.as_tensor(~valid, device=logp.device)
    return torch.logsumexp(picked.masked_fill(mask, -torch.inf), dim=1)
