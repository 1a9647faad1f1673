"""Adaptive λ without the target (SPEC §9; Drozdov et al. 2022), and the oracle per-bin λ.

λ is a function of a per-position feature known at test time: the nearest neighbour's
distance (`nn_distance`) or the LM's entropy (`lm_entropy`). `fit` sees only a VALIDATION
split: bin edges are quantiles of the validation feature (equal-population bins), and each
bin's λ is the grid value minimising the bin's mean NLL of λ p_kNN + (1 − λ) p_LM.
`AdaptiveLambda.apply` maps evaluation features to bins with those edges (values outside
go to the end bins) and returns λ per position; evaluation targets are never needed.

The per-frequency-bin λ (`oracle_by_bin`) is fitted on the evaluation targets' own bins:
the target's bin is unknown at test time, so it is an upper bound, labelled `ORACLE_LABEL`.
Pure numpy; no loop over positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORACLE_LABEL = "oracle (upper bound)"
FEATURES = ("nn_distance", "lm_entropy")  # features known at test time


def default_grid() -> np.ndarray:
    """λ grid 0, 0.01, …, 1 with exact endpoints (101 values, float64)."""
    return np.arange(101, dtype=np.float64) / 100.0


def grid_minimiser(
    group: np.ndarray, n_groups: int, p_lm: np.ndarray, p_knn: np.ndarray, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(λ (n_groups,), positions per group (n_groups,)): per group g in 0..n_groups-1, the grid
    value minimising the summed NLL −ln(λ p_kNN + (1 − λ) p_LM) over the group's positions
    (first minimiser on ties; NaN for an empty group). One vectorised pass per grid value."""
    group = np.asarray(group, dtype=np.int64)
    assert group.shape == p_lm.shape == p_knn.shape and group.ndim == 1, (group.shape, p_lm.shape, p_knn.shape)
    sums = np.empty((len(grid), n_groups))  # (G, B) summed NLL
    with np.errstate(divide="ignore"):
        for i, lam in enumerate(grid):
            sums[i] = np.bincount(group, weights=-np.log(lam * p_knn + (1.0 - lam) * p_lm), minlength=n_groups)
    sums[np.isnan(sums)] = np.inf
    count = np.bincount(group, minlength=n_groups)
    return np.where(count > 0, grid[np.argmin(sums, axis=0)], np.nan), count


@dataclass(frozen=True)
class AdaptiveLambda:
    """λ per equal-population bin of a test-time feature, fitted on a validation split."""

    feature: str  # name of the per-position feature ("nn_distance", "lm_entropy", ...)
    edges: np.ndarray  # (B - 1,) float64 interior bin edges: quantiles of the validation feature
    lam: np.ndarray  # (B,) float64 λ of each bin (the validation grid minimiser)
    grid: np.ndarray  # (G,) float64 the λ grid searched
    n_fit: np.ndarray  # (B,) int64 validation positions per bin

    @property
    def n_bins(self) -> int:
        return int(len(self.lam))

    def bin_of(self, feature: np.ndarray) -> np.ndarray:
        """Bin (T,) int64 of each feature value with the validation edges; outside values go to the end bins."""
        return np.searchsorted(self.edges, np.asarray(feature, dtype=np.float64), side="right")

    def apply(self, feature: np.ndarray) -> np.ndarray:
        """λ (T,) float64 of each evaluation position from its feature alone."""
        return self.lam[self.bin_of(feature)]


def fit(
    valid_feature: np.ndarray,
    valid_p_lm: np.ndarray,
    valid_p_knn: np.ndarray,
    feature: str,
    n_bins: int = 10,
    grid: np.ndarray | None = None,
) -> AdaptiveLambda:
    """Fit λ per equal-population bin of `valid_feature` (T_v,) on the validation split only.

    valid_p_lm / valid_p_knn (T_v,) are p_LM(y) and p_kNN(y) of the validation targets.
    A bin that holds no validation position (tied edges) gets the single best λ overall.
    """
    x = np.asarray(valid_feature, dtype=np.float64)
    p_lm, p_knn = np.asarray(valid_p_lm, dtype=np.float64), np.asarray(valid_p_knn, dtype=np.float64)
    assert x.ndim == 1 and x.shape == p_lm.shape == p_knn.shape and len(x) > 0, (x.shape, p_lm.shape, p_knn.shape)
    assert np.all(np.isfinite(x)), "validation feature has NaN / inf"
    assert n_bins >= 1
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    edges = np.quantile(x, np.arange(1, n_bins) / n_bins)  # (B - 1,)
    bins = np.searchsorted(edges, x, side="right")
    lam, count = grid_minimiser(bins, n_bins, p_lm, p_knn, grid)
    if np.any(count == 0):
        lam[count == 0] = grid_minimiser(np.zeros_like(bins), 1, p_lm, p_knn, grid)[0][0]
    return _frozen(AdaptiveLambda(feature, edges, lam, grid.copy(), count))


def _frozen(a: AdaptiveLambda) -> AdaptiveLambda:
    """Make the fitted arrays read-only (the object is shared; nothing may change it later)."""
    for arr in (a.edges, a.lam, a.grid, a.n_fit):
        arr.flags.writeable = False
    return a


def oracle_by_bin(
    freq_bin: np.ndarray, p_lm: np.ndarray, p_knn: np.ndarray, grid: np.ndarray | None = None
) -> dict[int, float]:
    """ORACLE (upper bound): {frequency bin: λ} minimising each bin's NLL on these very
    positions, whose target bins are unknown at test time."""
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    bins, inv = np.unique(np.asarray(freq_bin), return_inverse=True)
    lam, _ = grid_minimiser(inv.ravel(), len(bins), np.asarray(p_lm, np.float64), np.asarray(p_knn, np.float64), grid)
    return {int(b): float(v) for b, v in zip(bins, lam, strict=True)}


def nn_distance(dists: np.ndarray) -> np.ndarray:
    """Nearest neighbour's distance (T,) from neighbour distances (T, k) (missing = inf / NaN ignored)."""
    d = np.where(np.isfinite(dists), dists, np.inf).astype(np.float64)
    return d.min(axis=1)


def lm_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy in nats (B,) of softmax(logits) (B, V), computed in float64 row by row block."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(z).sum(axis=1))  # (B,)
    p = np.exp(z - log_z[:, None])
    return log_z - (p * z).sum(axis=1)
