"""What-if re-scoring of a run from its stored neighbours (SPEC §2, vectorised numpy).

The run stores the first `store_neighbors` neighbours of every evaluation position
(`neighbors` table). From them p_kNN is recomputed for another k (<= store_neighbors),
temperature τ, distance source (pq / exact) and λ, without faiss. When k < run.k, or
store_neighbors < run.k, the result differs from the run's own p_kNN (which used run.k
neighbours): the softmax is normalised over fewer neighbours.

Mitigation experiments (first attempts, not from the paper):
- frequency-adaptive λ: one λ per frequency bin of the target. The target is unknown at
  test time, so this is an oracle diagnostic (an upper bound for any bin-wise λ);
  `best_lambda_per_bin` finds the best grid value per bin.
- IDF-weighted p_kNN: neighbour j's weight is exp(-d_j / τ) · idf(v_j) with
  idf(v) = ln(1 + N / freq(v)), renormalised over the neighbours; rare values count more.
No Python loop runs over positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import knn
from knnlm_core.bins import bin_labels


@dataclass(frozen=True)
class StoredNeighbours:
    """Per-position arrays of a run (T = evaluation positions, S = stored neighbours)."""

    nbr_values: np.ndarray  # (T, S) int32 value token of each neighbour, -1 = none stored
    dists_pq: np.ndarray  # (T, S) float32 PQ (index) squared L2 distances
    dists_exact: np.ndarray  # (T, S) float32 exact squared L2 distances
    targets: np.ndarray  # (T,) int32 target token ids
    p_lm: np.ndarray  # (T,) float64
    p_knn_run: np.ndarray  # (T,) float64 the run's own p_kNN (run.k neighbours)
    freq_bin: np.ndarray  # (T,) int16
    type_freq: np.ndarray  # (V,) int64 datastore frequency of every token id (0 = unseen)

    @property
    def n_stored(self) -> int:
        """S: neighbours stored per position."""
        return int(self.nbr_values.shape[1])


def load_neighbours(cur: duckdb.DuckDBPyConnection) -> StoredNeighbours:
    """Read the neighbour and evaluation arrays of a run (one pass over each table)."""
    ev = cur.execute("SELECT token_id, p_lm, p_knn, freq_bin FROM eval_tokens ORDER BY pos").fetchnumpy()
    t = len(ev["token_id"])
    s = int(cur.execute("SELECT coalesce(max(rank), 0) FROM neighbors").fetchone()[0])
    n_rows = int(cur.execute("SELECT count(*) FROM neighbors").fetchone()[0])
    if n_rows == t * s:
        # Complete table: the pipeline writes it ORDER BY pos, rank and DuckDB preserves insertion
        # order, so the three value columns reshape to (T, S) without reading pos / rank.
        nb = cur.execute("SELECT token_id, distance_pq, distance_exact FROM neighbors").fetchnumpy()
        nbr_values, dists_pq, dists_exact = (
            np.asarray(nb[c], dtype=d).reshape(t, s)
            for c, d in (("token_id", np.int32), ("distance_pq", np.float32), ("distance_exact", np.float32))
        )
    else:
        nb = cur.execute("SELECT pos, rank, token_id, distance_pq, distance_exact FROM neighbors").fetchnumpy()
        nbr_values, dists_pq, dists_exact = _to_grid(nb, t, s)
    tf = cur.execute("SELECT token_id, freq FROM token_types").fetchnumpy()
    vocab_size = int(max(tf["token_id"].max(initial=0), nbr_values.max(initial=0), ev["token_id"].max(initial=0))) + 1
    type_freq = np.zeros(vocab_size, dtype=np.int64)  # (V,)
    type_freq[np.asarray(tf["token_id"], dtype=np.int64)] = np.asarray(tf["freq"], dtype=np.int64)
    return StoredNeighbours(
        nbr_values=nbr_values,
        dists_pq=dists_pq,
        dists_exact=dists_exact,
        targets=np.asarray(ev["token_id"], dtype=np.int32),
        p_lm=np.asarray(ev["p_lm"], dtype=np.float64),
        p_knn_run=np.asarray(ev["p_knn"], dtype=np.float64),
        freq_bin=np.asarray(ev["freq_bin"], dtype=np.int16),
        type_freq=type_freq,
    )


def _to_grid(nb: dict, t: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, S) value / pq / exact arrays from neighbour rows; missing (pos, rank) = PAD / inf.

    Fast path: rows complete and in (pos, rank) order (how the run writes them) are reshaped.
    """
    pos, rank = np.asarray(nb["pos"]), np.asarray(nb["rank"])
    cols = ("token_id", "distance_pq", "distance_exact")
    dtypes = (np.int32, np.float32, np.float32)
    if (
        len(pos) == t * s
        and np.array_equal(rank, np.tile(np.arange(1, s + 1), t))
        and np.array_equal(pos, np.repeat(np.arange(t), s))
    ):
        return tuple(np.asarray(nb[c], dtype=d).reshape(t, s) for c, d in zip(cols, dtypes, strict=True))
    rows, ranks = pos.astype(np.int64), rank.astype(np.int64) - 1
    out = (np.full((t, s), knn.PAD, np.int32), np.full((t, s), np.inf, np.float32), np.full((t, s), np.inf, np.float32))
    for arr, c in zip(out, cols, strict=True):
        arr[rows, ranks] = np.asarray(nb[c], dtype=arr.dtype)
    return out


def idf(type_freq: np.ndarray, n_entries: int) -> np.ndarray:
    """idf(v) = ln(1 + N / freq(v)) per token id (V,); 0 for tokens absent from the datastore."""
    f = type_freq.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(f > 0, np.log1p(n_entries / np.maximum(f, 1.0)), 0.0)


def rescore(
    data: StoredNeighbours, k: int, tau: float, source: str = "pq", idf_weights: np.ndarray | None = None
) -> np.ndarray:
    """p_kNN(target) (T,) from the first k stored neighbours, temperature tau, `pq` or `exact`
    distances; with `idf_weights` (V,) each neighbour's weight is multiplied by idf(value)."""
    if not 1 <= k <= data.n_stored:
        raise ValueError(f"k must be in 1..{data.n_stored} (neighbours stored per position)")
    if source not in ("pq", "exact"):
        raise ValueError("source must be 'pq' or 'exact'")
    vals = data.nbr_values[:, :k]  # (T, k)
    dists = (data.dists_pq if source == "pq" else data.dists_exact)[:, :k].astype(np.float64)  # (T, k)
    vals = np.where(np.isfinite(dists), vals, knn.PAD)
    dists = np.where(np.isfinite(dists), dists, 0.0)
    if idf_weights is not None:
        w = idf_weights[np.maximum(vals, 0)]  # (T, k)
        with np.errstate(divide="ignore"):
            dists = dists - tau * np.log(w)  # exp(-d'/tau) = exp(-d/tau) * w
        vals = np.where(w > 0, vals, knn.PAD)
        dists = np.where(np.isfinite(dists), dists, 0.0)
    return knn.p_knn_of(dists, vals, data.targets, tau)


def lam_per_position(freq_bin: np.ndarray, lam_by_bin: dict[int, float], default: float) -> np.ndarray:
    """λ of each position (T,) from a {bin: λ} map (bins absent from the map get `default`)."""
    lut_bins = np.array(sorted(lam_by_bin), dtype=np.int64)
    lam = np.full(freq_bin.shape, float(default))
    if len(lut_bins):
        idx = np.searchsorted(lut_bins, freq_bin)
        idx_c = np.minimum(idx, len(lut_bins) - 1)
        known = lut_bins[idx_c] == freq_bin
        lam[known] = np.array([lam_by_bin[int(b)] for b in lut_bins])[idx_c[known]]
    return lam


def ppl_by_bin(freq_bin: np.ndarray, p_lm: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """Per bin (ascending): n_tokens and exp(mean -ln p) of p_lm and of p (both (T,))."""
    bins, inv = np.unique(freq_bin, return_inverse=True)
    n = np.bincount(inv)
    with np.errstate(divide="ignore"):
        nll_lm = np.bincount(inv, weights=-np.log(p_lm)) / n
        nll = np.bincount(inv, weights=-np.log(p)) / n
    return pd.DataFrame(
        {"freq_bin": bins, "bin": bin_labels(bins), "n_tokens": n, "ppl_lm": np.exp(nll_lm), "ppl": np.exp(nll)}
    )


def overall_ppl(p: np.ndarray) -> float:
    """exp(mean -ln p) over all positions."""
    with np.errstate(divide="ignore"):
        return float(np.exp(np.mean(-np.log(p))))


def best_lambda_per_bin(
    freq_bin: np.ndarray, p_lm: np.ndarray, p_knn: np.ndarray, grid: np.ndarray | None = None
) -> dict[int, float]:
    """Oracle λ per bin: the grid value minimising the bin's mean NLL of λ p_kNN + (1-λ) p_LM."""
    grid = np.linspace(0.0, 0.95, 20) if grid is None else np.asarray(grid, dtype=np.float64)
    bins, inv = np.unique(freq_bin, return_inverse=True)
    p = grid[:, None] * p_knn[None, :] + (1.0 - grid[:, None]) * p_lm[None, :]  # (G, T)
    with np.errstate(divide="ignore"):
        nll = -np.log(p)  # (G, T)
    sums = np.stack([np.bincount(inv, weights=row, minlength=len(bins)) for row in nll])  # (G, B)
    best = grid[np.argmin(sums, axis=0)]
    return {int(b): float(lam) for b, lam in zip(bins, best, strict=True)}
