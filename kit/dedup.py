"""Near-duplicate detection over perceptual hashes.

Images whose 64-bit hashes differ in at most `max_distance` bits are the same photo (re-encoded,
resized); `group_ids` joins them transitively so they share a fold:

    pairs = near_duplicate_pairs(hashes, max_distance=6)
    groups = group_ids(len(hashes), pairs)
"""

from __future__ import annotations

import numpy as np


def near_duplicate_pairs(
    hashes: np.ndarray, other: np.ndarray | None = None, max_distance: int = 6, chunk: int = 2048
) -> np.ndarray:
    """Index pairs (i, j) with Hamming distance <= max_distance: within `hashes` (i < j) or, when
    `other` is given, between hashes[i] and other[j]. Exact all-pairs, chunked to bound memory."""
    a = np.asarray(hashes, dtype=np.uint64)
    b = a if other is None else np.asarray(other, dtype=np.uint64)
    found = []
    for start in range(0, len(a), chunk):
        block = a[start : start + chunk, None]
        distance = np.bitwise_count(block ^ b[None, :])
        i, j = np.nonzero(distance <= max_distance)
        i += start
        if other is None:
            keep = i < j
            i, j = i[keep], j[keep]
        found.append(np.stack([i, j], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def group_ids(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph; ids are 0.. in order of each group's first member."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    # Each root is its component's smallest index, so sorting roots orders groups by first member.
    roots = np.array([root(x) for x in range(n)], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1]
