"""What-if re-scoring of a run (SPEC §2, §9): exact where the run's data allow it.

- λ only: p_kNNLM = λ p_kNN + (1 − λ) p_LM with the run's own p_kNN (`eval_tokens.p_knn`,
  computed from run.k neighbours): exact for any λ, no neighbours needed.
- k, τ or distance source: p_kNN is re-scored from the stored neighbours (`neighbors`
  table, the first `store_neighbors` of the run.k the index returned, in rank order).
  Exact when all k requested neighbours are stored (k <= store_neighbors: the index's
  top-k is the prefix of its top-run.k); otherwise re-scored from the S stored ones and
  labelled approximate (`plan` decides; the page shows the run's own value beside).
- Mitigation experiments: the per-frequency-bin λ (an ORACLE, an upper bound: the target's
  bin is unknown at test time; `knnlm_core.adaptive`), and IDF-weighted p_kNN: neighbour j
  weighs exp(-d_j / τ) · idf(v_j), idf(v) = ln(1 + N / freq(v)), renormalised.

Re-scoring is vectorised over row blocks held in cache (float64, numpy ufuncs release the
GIL, so blocks run on `threads` threads); no Python loop runs over positions. Numpy only:
the app imports this module.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import adaptive, knn
from knnlm_core.bins import bin_labels

ROWS = 256  # positions per re-scoring block: (256, k) float64 is 2 MB at k = 1024 (stays in cache)
SOURCES = ("pq", "exact")


@dataclass(frozen=True)
class StoredNeighbours:
    """Per-position arrays of a run (T = evaluation positions, S = stored neighbours).

    Missing neighbours have value -1 and distance +inf; a distance unknown for one source is +inf there.
    """

    nbr_values: np.ndarray  # (T, S) int32 value token of each neighbour, -1 = none stored
    dists_pq: np.ndarray  # (T, S) float32 PQ (index) squared L2 distances, inf = missing
    dists_exact: np.ndarray  # (T, S) float32 exact squared L2 distances, inf = missing
    targets: np.ndarray  # (T,) int32 target token ids
    p_lm: np.ndarray  # (T,) float64
    p_knn_run: np.ndarray  # (T,) float64 the run's own p_kNN (run.k neighbours)
    freq_bin: np.ndarray  # (T,) int16
    type_freq: np.ndarray  # (V,) int64 datastore frequency of every token id (0 = unseen)
    match: np.ndarray  # (T, S) bool neighbour present and its value is the target

    @property
    def n_stored(self) -> int:
        """S: neighbours stored per position."""
        return int(self.nbr_values.shape[1])


def from_arrays(
    nbr_values: np.ndarray,
    dists_pq: np.ndarray,
    dists_exact: np.ndarray,
    targets: np.ndarray,
    p_lm: np.ndarray,
    p_knn_run: np.ndarray,
    freq_bin: np.ndarray,
    type_freq: np.ndarray,
) -> StoredNeighbours:
    """StoredNeighbours with missing neighbours normalised (value -1, distances inf) and the
    target-match mask computed once (everything τ-independent is done here, not per re-score)."""
    t, s = nbr_values.shape
    assert dists_pq.shape == dists_exact.shape == (t, s) and targets.shape == p_lm.shape == (t,)
    values = np.asarray(nbr_values, dtype=np.int32)
    present = values != knn.PAD  # a neighbour whose distance of one source is unknown weighs 0 under that source
    dq, de = (_with_inf(d, present) for d in (dists_pq, dists_exact))
    targets = np.asarray(targets, dtype=np.int32)
    return StoredNeighbours(
        nbr_values=values, dists_pq=dq, dists_exact=de, targets=targets,
        p_lm=np.asarray(p_lm, dtype=np.float64), p_knn_run=np.asarray(p_knn_run, dtype=np.float64),
        freq_bin=np.asarray(freq_bin, dtype=np.int16), type_freq=np.asarray(type_freq, dtype=np.int64),
        match=present & (values == targets[:, None]),
    )


def _with_inf(d: np.ndarray, present: np.ndarray) -> np.ndarray:
    """float32 distances (T, S) with +inf where the neighbour is absent or its distance unknown
    (no copy when nothing is missing)."""
    d = np.asarray(d, dtype=np.float32)
    ok = present & np.isfinite(d)
    return d if ok.all() else np.where(ok, d, np.inf).astype(np.float32)


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
    return from_arrays(
        nbr_values, dists_pq, dists_exact, np.asarray(ev["token_id"]), np.asarray(ev["p_lm"]),
        np.asarray(ev["p_knn"]), np.asarray(ev["freq_bin"]), type_freq,
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


@dataclass(frozen=True)
class RunSettings:
    """The retrieval settings the run's own p_kNN was computed with."""

    k: int  # neighbours the index returned per position
    tau: float  # temperature τ
    source: str  # distance source: "pq" or "exact"
    lam: float  # the run's single λ
    n_stored: int  # neighbours stored per position (store_neighbors)


@dataclass(frozen=True)
class Plan:
    """How a What-if p_kNN for (k, τ, source) is obtained from a run."""

    k: int  # requested k
    k_used: int  # neighbours actually re-scored (0 = the run's own p_kNN is used)
    runs_own: bool  # (k, τ, source) are the run's: p_kNN is eval_tokens.p_knn itself
    exact: bool  # the result is the exact kNN-LM p_kNN at (k, τ, source)
    label: str  # what the page shows next to the numbers


def run_settings(info: dict, n_stored: int) -> RunSettings:
    """RunSettings from the run row (dict of the `run` table)."""
    return RunSettings(
        int(info["k"]), float(info["temperature"]), str(info["distance_source"]), float(info["lambda"]), int(n_stored)
    )


def plan(k: int, tau: float, source: str, run: RunSettings) -> Plan:
    """Decide how p_kNN at (k, τ, source) is computed and whether it is exact."""
    if not 1 <= k <= run.k:
        raise ValueError(f"k must be in 1..{run.k} (neighbours the run's index returned per position)")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    if k == run.k and source == run.source and math.isclose(tau, run.tau, rel_tol=1e-12, abs_tol=1e-12):
        return Plan(k, 0, True, True, f"exact: the run's own p_kNN (k = {k}, τ = {run.tau:g}, {source} distances)")
    if k <= run.n_stored:
        return Plan(k, k, False, True, f"exact: re-scored from all {k} neighbours, stored for every position")
    if run.n_stored == 0:
        return Plan(k, 0, False, False, "not available: the run stores no neighbours, so only λ can change")
    return Plan(
        k, run.n_stored, False, False,
        f"approximate: k = {k} needs {k} neighbours per position but the run stores only {run.n_stored}; "
        f"re-scored from those {run.n_stored} (the softmax is normalised over fewer neighbours)",
    )


def idf(type_freq: np.ndarray, n_entries: int) -> np.ndarray:
    """idf(v) = ln(1 + N / freq(v)) per token id (V,); 0 for tokens absent from the datastore."""
    f = type_freq.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(f > 0, np.log1p(n_entries / np.maximum(f, 1.0)), 0.0)


def rescore(
    data: StoredNeighbours,
    k: int,
    tau: float,
    source: str = "pq",
    idf_weights: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """p_kNN(target) (T,) float64 from the first k stored neighbours, temperature tau, `pq` or
    `exact` distances; with `idf_weights` (V,) each neighbour's weight is multiplied by idf(value).

    Per row: Σ_{match} w_j / Σ_j w_j with w_j = exp(-(d_j - min_j d_j) / tau), in float64, over
    blocks of ROWS positions on `threads` threads (default: all CPUs, at most 8).
    """
    if not 1 <= k <= data.n_stored:
        raise ValueError(f"k must be in 1..{data.n_stored} (neighbours stored per position)")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    if not tau > 0:
        raise ValueError("tau must be > 0")
    dists = data.dists_pq if source == "pq" else data.dists_exact  # (T, S) float32, inf = missing
    t = len(data.targets)
    out = np.zeros(t)  # (T,)
    n = max(1, min(threads or min(os.cpu_count() or 1, 8), -(-t // ROWS)))
    spans = [(i * t // n, (i + 1) * t // n) for i in range(n)]

    def work(span: tuple[int, int]) -> None:
        buf = np.empty((ROWS, k))  # (ROWS, k) float64 weights of one block
        for lo in range(span[0], span[1], ROWS):
            hi = min(lo + ROWS, span[1])
            out[lo:hi] = _block(dists[lo:hi, :k], data.match[lo:hi, :k], data.nbr_values[lo:hi, :k],
                                tau, idf_weights, buf[: hi - lo])

    if n == 1:
        work(spans[0])
    else:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(work, spans))
    return out


def _block(d: np.ndarray, match: np.ndarray, vals: np.ndarray, tau: float, idf_w: np.ndarray | None,
           buf: np.ndarray) -> np.ndarray:
    """p_kNN(target) (r,) of one block: d (r, k) float32 (inf = missing), match (r, k) bool."""
    low = d.min(axis=1).astype(np.float64)  # (r,) shift: the largest weight of a row is exp(0) = 1
    low[~np.isfinite(low)] = 0.0  # a row without neighbours: every weight stays exp(-inf) = 0
    np.multiply(d, -1.0 / tau, out=buf, dtype=np.float64)
    np.add(buf, (low / tau)[:, None], out=buf)
    np.exp(buf, out=buf)  # (r, k) w_j
    if idf_w is not None:
        buf *= idf_w[np.maximum(vals, 0)]  # missing neighbours already weigh 0
    den = buf.sum(axis=1)
    num = np.einsum("ij,ij->i", buf, match)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def p_knn_for(data: StoredNeighbours, p: Plan, tau: float, source: str) -> np.ndarray:
    """p_kNN (T,) following a Plan: the run's own column, or re-scored from p.k_used neighbours."""
    if p.runs_own or p.k_used == 0:
        return data.p_knn_run
    return rescore(data, p.k_used, tau, source)


def interpolate(data: StoredNeighbours, lam: float | np.ndarray, p_knn: np.ndarray | None = None) -> np.ndarray:
    """p_kNNLM (T,) = λ p_kNN + (1 − λ) p_LM; p_kNN defaults to the run's own (exact for any λ)."""
    return knn.interpolate(data.p_lm, data.p_knn_run if p_knn is None else p_knn, lam)


def choose_tau(
    valid: StoredNeighbours, taus: np.ndarray, lam: float, k: int | None = None, source: str = "pq"
) -> tuple[float, np.ndarray]:
    """(best τ, PPL per τ (G,)) on a VALIDATION split's stored neighbours: the grid value whose
    λ-interpolated PPL is lowest (SPEC §9: τ of a whitened datastore is chosen this way)."""
    k = valid.n_stored if k is None else k
    ppl = np.array([overall_ppl(interpolate(valid, lam, rescore(valid, k, float(t), source))) for t in taus])
    return float(np.asarray(taus)[int(np.argmin(ppl))]), ppl


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
    """ORACLE (upper bound) λ per frequency bin: the grid value (default 0, 0.01, …, 1) minimising
    the bin's mean NLL of λ p_kNN + (1-λ) p_LM on these very positions (adaptive.oracle_by_bin)."""
    return adaptive.oracle_by_bin(freq_bin, p_lm, p_knn, grid)
