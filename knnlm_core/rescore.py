"""p_kNN re-scored from stored neighbours at any k ≤ K and τ (SPEC §2, §9; the What-if page).

Per row: p_kNN(target) = Σ_{v_j = target} w_j / Σ_j w_j over the first k neighbours, with
w_j = exp(-(d_j - m) / τ) · weight(v_j): the float64 softmax of `knn.p_knn_of` (`knn.p_knn_weighted`
with weights). The shift m cancels in the ratio; it only keeps the weights in float64's full-precision
range, so it is 0 where they already are (no pass at all), else the row's first distance (no pass for
the rows' minima), else its smallest. Weights are computed for ROWS rows at a time, so no (T, K)
float64 temporary is made (the arrays may be memory-mapped shards); the numerator gathers the target
neighbours' weights through their positions, which depend on neither τ, k nor the distances: they are
found once per (values, targets) pair and cached. Numpy only (the app imports this module); blocks of
rows run on threads (numpy releases the GIL).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROWS = 256  # positions per block (fastest of 32..1024 at K = 1024 here: fewer numpy calls vs cache)
NEAR = 64.0  # a row is left unshifted when its first neighbour's weight exp(-d / τ) is in [2^-NEAR, 2^NEAR]
FAR = 2.0**-100  # a row whose weights sum outside [FAR, 1 / FAR] is redone shifted by its smallest distance
KEPT_HITS = 2  # (values, targets) pairs whose target-neighbour positions stay cached
LOG2E = 1.0 / math.log(2.0)

_HITS: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, np.ndarray]] = {}  # least recently used first
_LOCK = threading.Lock()


def p_knn(
    values: np.ndarray,
    dists: np.ndarray,
    targets: np.ndarray,
    k: int,
    tau: float,
    weights: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """p_kNN(target) (T,) float64 from the first k of K neighbours per position at temperature tau.

    values (T, K) int neighbour tokens (-1 = missing), dists (T, K) float32 squared L2 distances (+inf
    = missing or unknown: such a neighbour weighs 0), targets (T,) int; weights (V,) optional factor per
    token (IDF). 0 for a row without neighbours. `threads` default: all CPUs, at most 8.
    """
    t, n = _check(values, dists, targets, k, tau)
    hits = _hits(values, targets, threads)
    scale = -LOG2E / tau  # exp(-x / τ) = exp2(x · scale): numpy's exp2 is faster than its exp
    w_of = None if weights is None else np.append(np.asarray(weights, dtype=np.float64), 0.0)  # value -1: 0
    out = np.zeros(t)  # (T,)

    def span(lo: int, hi: int) -> None:
        buf = np.zeros((min(ROWS, hi - lo), n))  # columns k.. stay 0: target neighbours past k gather 0
        for a in range(lo, hi, ROWS):
            b = min(a + ROWS, hi)
            out[a:b] = _block(values, dists, hits, a, b, k, scale, w_of, buf[: b - a])

    _on_threads(t, threads, span)
    return out


def _check(values: np.ndarray, dists: np.ndarray, targets: np.ndarray, k: int, tau: float) -> tuple[int, int]:
    """(T, K) of consistent inputs; ValueError naming the problem otherwise."""
    if values.ndim != 2 or dists.shape != values.shape or targets.shape != values.shape[:1]:
        raise ValueError(f"values and dists must be (T, K) and targets (T,); got {values.shape}, {dists.shape}, "
                         f"{targets.shape}")
    n = values.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (neighbours stored per position), got {k}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return values.shape


def _block(values: np.ndarray, dists: np.ndarray, hits: np.ndarray, lo: int, hi: int, k: int, scale: float,
           weights: np.ndarray | None, buf: np.ndarray) -> np.ndarray:
    """p_kNN (hi - lo,) of rows [lo, hi); buf (hi - lo, K) float64 scratch whose columns k.. are 0.

    A row is shifted by its first distance (the index returns the nearest first) only when that
    neighbour's unshifted weight is outside [2^-NEAR, 2^NEAR]: no pass for the rows' minima, and none
    for a shift in a block that needs none. Rows whose weights then sum outside [FAR, 1 / FAR] (first
    neighbour missing or far from the nearest, no neighbour) are redone shifted by their smallest
    distance: every weight that matters is a normal float64."""
    n = buf.shape[1]
    d, v = dists[lo:hi, :k], values[lo:hi, :k]  # (r, k)
    shift = _finite(d[:, 0])  # (r,)
    shift[np.abs(shift * scale) <= NEAR] = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # a row nearer than its first distance may overflow
        w = _weights(d, v, shift, scale, weights, buf[:, :k])
        den = w.sum(axis=1)  # (r,)
    redo = np.flatnonzero(~((den >= FAR) & (den <= 1.0 / FAR)))
    if len(redo):
        dr = d[redo]  # (f, k)
        if weights is not None:  # a neighbour of weight 0 is dropped: the shift is the nearest one kept
            dr = np.where(np.take(weights, v[redo]) > 0, dr, np.inf)
        w[redo] = _weights(dr, v[redo], _finite(dr.min(axis=1)), scale, weights, np.empty((len(redo), k)))
        den[redo] = w[redo].sum(axis=1)
    a, b = np.searchsorted(hits, (lo * n, hi * n))
    at = hits[a:b] - lo * n  # positions of the block's target neighbours in buf, row-major
    num = np.bincount(at // n, buf.reshape(-1)[at], minlength=hi - lo)
    return np.divide(num, den, out=np.zeros(hi - lo), where=den > 0)


def _finite(shift: np.ndarray) -> np.ndarray:
    """float64 copy of per-row distances (r,) with +inf (no neighbour) replaced by 0."""
    shift = shift.astype(np.float64)
    shift[shift == np.inf] = 0.0  # a row without neighbours: every weight stays exp(-inf) = 0
    return shift


def _weights(d: np.ndarray, v: np.ndarray, shift: np.ndarray, scale: float, weights: np.ndarray | None,
             out: np.ndarray) -> np.ndarray:
    """out (r, k) float64 = exp2((d - shift) · scale) · weights[v], shift (r,); returns out."""
    np.copyto(out, d)  # float32 -> float64: exact (a cast copy is faster than a mixed-type ufunc)
    if shift.any():
        out -= shift[:, None]
    out *= scale
    np.exp2(out, out=out)
    if weights is not None:
        out *= np.take(weights, v)  # weights[-1] = 0: a missing neighbour weighs 0
    return out


def _hits(values: np.ndarray, targets: np.ndarray, threads: int | None) -> np.ndarray:
    """Sorted row-major positions (M,) int64 in the (T, K) grid of the neighbours whose value is their
    row's target; cached per (values, targets) array pair (the KEPT_HITS last used; never mutate the
    arrays of a pair in place)."""
    key = (id(values), id(targets))
    with _LOCK:
        kept = _HITS.pop(key, None)
        if kept is not None and kept[0]() is values and kept[1]() is targets:
            _HITS[key] = kept  # most recently used last
            return kept[2]
    t, n = values.shape
    pieces: dict[int, np.ndarray] = {}

    def span(lo: int, hi: int) -> None:
        for a in range(lo, hi, ROWS):
            b = min(a + ROWS, hi)
            pieces[a] = np.flatnonzero(values[a:b] == targets[a:b, None]) + a * n

    _on_threads(t, threads, span)
    hits = np.concatenate([pieces[a] for a in sorted(pieces)] or [np.zeros(0, np.int64)])
    with _LOCK:
        _HITS[key] = (weakref.ref(values), weakref.ref(targets), hits)
        while len(_HITS) > KEPT_HITS:
            del _HITS[next(iter(_HITS))]
    return hits


def _on_threads(t: int, threads: int | None, fn: Callable[[int, int], None]) -> None:
    """fn(lo, hi) on contiguous spans of [0, t), one per thread (`threads`, default all CPUs, at most 8;
    never more than blocks of ROWS rows)."""
    n = max(1, min(threads or min(os.cpu_count() or 1, 8), -(-t // ROWS)))
    spans = [(i * t // n, (i + 1) * t // n) for i in range(n)]
    if n == 1:
        fn(*spans[0])
    else:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda s: fn(*s), spans))
