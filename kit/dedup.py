"""Near-duplicate detection over perceptual hashes.

Hashes within `max_distance` bits propose pairs; each proposal is confirmed only if the two images'
grey thumbnails correlate at `min_similarity` or more. The hash alone is not enough: photos of regular
structures (solar cells, documents, tiles) share low frequencies and would chain into huge false groups.
`group_ids` then joins confirmed pairs transitively so each group shares a fold:

    pairs = find_near_duplicates(hashes, thumbs)
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


def thumbnail_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of flattened thumbnails, row by row: 1 for the same picture."""
    if not len(a):
        return np.zeros(0)
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide((a * b).sum(axis=1), norm, out=np.ones(len(a)), where=norm > 0)


def find_near_duplicates(
    hashes: np.ndarray,
    thumbs: np.ndarray,
    other_hashes: np.ndarray | None = None,
    other_thumbs: np.ndarray | None = None,
    max_distance: int = 8,
    min_similarity: float = 0.99,
) -> np.ndarray:
    """Hash-proposed pairs whose thumbnails confirm them (within one set, or between two sets)."""
    pairs = near_duplicate_pairs(hashes, other_hashes, max_distance)
    right = thumbs if other_thumbs is None else other_thumbs
    similar = thumbnail_similarity(thumbs[pairs[:, 0]], right[pairs[:, 1]]) >= min_similarity
    return pairs[similar]


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
