"""kNN-LM math (SPEC §2 and §4): p_kNN, interpolation, hits, target rank.

Inputs are the faiss search results of Q queries: `dists` (Q, k) squared L2 distances
and `nbr_values` (Q, k) the value (next token) of each neighbour, with -1 where faiss
returned no neighbour (id -1); such slots carry no weight and never match a target.
"""

from __future__ import annotations

import numpy as np

PAD = -1  # value of a missing neighbour


def _masked_logits(dists: np.ndarray, tau: float, nbr_values: np.ndarray) -> np.ndarray:
    """-dists / tau (Q, k) in float64, -inf on missing neighbours."""
    assert dists.shape == nbr_values.shape and dists.ndim == 2
    logits = -dists.astype(np.float64) / tau
    logits[nbr_values == PAD] = -np.inf
    return logits


def _logsumexp_rows(logits: np.ndarray) -> np.ndarray:
    """Stable log Σ exp per row (Q,); 0 for a row that is all -inf (no neighbour)."""
    top = np.max(logits, axis=1)  # (Q,)
    top[~np.isfinite(top)] = 0.0
    with np.errstate(divide="ignore"):
        lse = top + np.log(np.sum(np.exp(logits - top[:, None]), axis=1))
    lse[~np.isfinite(lse)] = 0.0  # no neighbour: keep every weight at -inf rather than NaN
    return lse


def softmax_weights(dists: np.ndarray, tau: float, nbr_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised weights (Q, k), log normaliser (Q,)) of -dists / tau; weight 0 on missing neighbours."""
    logits = _masked_logits(dists, tau, nbr_values)
    log_z = _logsumexp_rows(logits)
    return np.exp(logits - log_z[:, None]), log_z


def log_weights(dists: np.ndarray, tau: float, nbr_values: np.ndarray) -> np.ndarray:
    """Normalised log softmax weights (Q, k) of -dists / tau; -inf on missing neighbours."""
    logits = _masked_logits(dists, tau, nbr_values)
    return logits - _logsumexp_rows(logits)[:, None]


def p_knn_of(dists: np.ndarray, nbr_values: np.ndarray, targets: np.ndarray, tau: float) -> np.ndarray:
    """p_kNN(target) per query (Q,): summed softmax weight of neighbours whose value is the target."""
    return p_knn_from_weights(np.exp(log_weights(dists, tau, nbr_values)), nbr_values, targets)


def p_knn_from_weights(weights: np.ndarray, nbr_values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """p_kNN(target) (Q,) from normalised neighbour weights (Q, k)."""
    return np.where(nbr_values == targets[:, None], weights, 0.0).sum(axis=1)


def interpolate(p_lm: np.ndarray, p_knn: np.ndarray, lam: float | np.ndarray) -> np.ndarray:
    """p_kNNLM = lam * p_kNN + (1 - lam) * p_LM (lam may be per query)."""
    return lam * p_knn + (1.0 - lam) * p_lm


def first_match_rank(match: np.ndarray) -> np.ndarray:
    """1-based rank of the first True per row (Q,) int32; 0 where there is none."""
    any_match = match.any(axis=1)
    return np.where(any_match, np.argmax(match, axis=1) + 1, 0).astype(np.int32)


def target_stats(nbr_values: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target_rank (Q,) with 0 = none, n_target (Q,)) of each query's neighbours."""
    match = nbr_values == targets[:, None]
    return first_match_rank(match), match.sum(axis=1).astype(np.int32)


def recall_at(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> np.ndarray:
    """recall@k (Q,) float64 = |approx top-k ∩ exact top-k| / k (SPEC §8); ids < 0 never match.

    Vectorised over rows: each id is offset by its row number times (max id + 2), so one
    global sort and `searchsorted` test membership for all rows at once.
    """
    a, e = approx_ids[:, :k].astype(np.int64), exact_ids[:, :k].astype(np.int64)
    q = len(a)
    span = int(max(a.max(initial=0), e.max(initial=0))) + 2
    offset = (np.arange(q, dtype=np.int64) * span)[:, None]
    e_keys = np.sort(np.where(e >= 0, e + offset, -1 - offset), axis=None)  # -1 - offset: never equals a key
    a_keys = np.where(a >= 0, a + offset, -2 - offset)
    at = np.minimum(np.searchsorted(e_keys, a_keys), len(e_keys) - 1)
    return (e_keys[at] == a_keys).sum(axis=1) / k


def p_knn_weighted(dists: np.ndarray, nbr_values: np.ndarray, targets: np.ndarray, tau: float,
                   type_weight: np.ndarray) -> np.ndarray:
    """p_kNN(target) (Q,) with neighbour j weighing exp(-d_j / tau) · type_weight[v_j], renormalised over
    the present neighbours (SPEC §9 IDF weighting: type_weight = idf; a weight of 0 drops the neighbour)."""
    logits = _masked_logits(dists, tau, nbr_values)
    with np.errstate(divide="ignore"):
        logits += np.log(np.asarray(type_weight, dtype=np.float64)[np.maximum(nbr_values, 0)])
    logits[nbr_values == PAD] = -np.inf
    weights = np.exp(logits - _logsumexp_rows(logits)[:, None])
    return p_knn_from_weights(weights, nbr_values, targets)
