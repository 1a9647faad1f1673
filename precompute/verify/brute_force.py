"""The float64 reference nearest-neighbour search the exact and contamination checks compare against."""

from __future__ import annotations

import numpy as np


def nearest_entries(keys, mus: np.ndarray, kk: int, block: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """(ids (J, kk), squared L2 (J, kk) float64, ascending) of the keys nearest each row of mus (J, d).

    A full scan picks kk + 32 candidates per row by float32 distances; they are then re-ranked
    by exact float64 distances, so ties at the cut can be told from real differences.
    """
    n = len(keys)
    kc = min(n, kk + 32)
    mus32 = np.ascontiguousarray(mus, dtype=np.float32)
    mu_sq = np.sum(mus32.astype(np.float64) ** 2, axis=1)  # (J,)
    best_d = np.full((len(mus), 0), np.inf)
    best_i = np.zeros((len(mus), 0), dtype=np.int64)
    for start in range(0, n, block):
        kb = np.asarray(keys[start : start + block], dtype=np.float32)  # (B, d)
        d2 = mu_sq[:, None] + np.sum(kb.astype(np.float64) ** 2, axis=1)[None, :] - 2.0 * (mus32 @ kb.T)  # (J, B)
        cat_d = np.concatenate([best_d, d2], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(kb)), d2.shape)], axis=1)
        if cat_d.shape[1] > kc:
            keep = np.argpartition(cat_d, kc - 1, axis=1)[:, :kc]
            cat_d, cat_i = np.take_along_axis(cat_d, keep, 1), np.take_along_axis(cat_i, keep, 1)
        best_d, best_i = cat_d, cat_i
    exact = np.stack([np.sum((np.asarray(keys[row], dtype=np.float64) - mu) ** 2, axis=1)
                      for row, mu in zip(best_i, mus32.astype(np.float64))])  # (J, kc)
    order = np.argsort(exact, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(exact, order, 1)
