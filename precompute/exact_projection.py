"""Exact k-nearest-neighbour search on a CPU by a proven lower bound in a principal subspace (SPEC §8).

Same answer as `precompute.exact.faiss_knn` (the k keys of smallest r = Σ (k − q)² in float32 by
the difference, ties by the lower id), found with about a third of the brute force's arithmetic.

The bound. Let μ be the keys' mean and V = [P | P⊥] an orthonormal basis whose first p columns
span the keys' top-p principal directions. For x = q − μ, y = k − μ:
    D = ||q − k||² = ||Pᵀ(x − y)||² + ||P⊥ᵀ(x − y)||² ≥ ||Pᵀx − Pᵀy||² + (||P⊥ᵀx|| − ||P⊥ᵀy||)²
(the reverse triangle inequality in the complement). So with features f(v) = [Pᵀ(v − μ), ||P⊥ᵀ(v − μ)||]
(p + 1 numbers), L = ||f(q) − f(k)||² ≤ D: a squared L2 distance between features, which faiss
searches by a GEMM of p + 1 (65) columns instead of d (192) columns. GPT-2-like keys are strongly
anisotropic (WikiText-2 demo keys: 96% of the variance in 64 of 192 directions), so L is tight.

The certificate (per query, checked, never assumed). faiss returns the s keys of smallest computed
L̃ (|L̃ − L_f| ≤ E, `faiss_error(p + 1)` over the feature norms, L_f the distance between the float32
features); their exact r are computed (`rerank_rows`, the pipeline's one distance routine) and the
top-k by (r, id) taken; r_k is the k-th, R = r_k / (1 − γ_r) bounds its exact distance. The float32
features differ from the exact ones by at most u per coordinate (computed in float64, rounded once),
so √L ≥ √L_f − u (||f(q)|| + ||f(k)||). A key outside the shortlist has L̃ ≥ t̃ (the s-th smallest),
hence D ≥ L ≥ (√(t̃ − E) − u (A + B))². When that exceeds R, no key outside can enter the top-k,
and the shortlist's top-k is the exact top-k. A query that fails is searched again with a four times
larger shortlist (`certified_search`; at s = N exact by construction). V from float64 `eigh` is
orthonormal to ~1e-15: the bound keeps a relative slack of 2⁻³⁰ for it.

When it is used: keys held in memory as float32 (the exact stage's resident keys) whose top-p
directions carry at least MIN_SHARE of the variance; otherwise the plain faiss path runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from precompute.exact import U32, certified_search, faiss_error, rerank_bound, rerank_rows, select_top

DIMS = 64  # principal directions of the bound (wt2 demo keys: 96% of the variance; 65-column GEMM)
SAMPLE = 200_000  # keys sampled to estimate the mean and covariance (the bound holds for any basis)
MIN_SHARE = 0.9  # variance share of the top DIMS directions below which the plain path is faster
SHORTLIST = 4  # first shortlist s = SHORTLIST * k (wt2: median 1,764 keys of L <= r_k at p = 64, k = 1024)
MIN_MARGIN = 256  # and at least k + MIN_MARGIN: for small k (contamination's groups of k = 1, 2, 4, ...) 4k is
# too short a list for the bound to certify, and every failed query costs another pass over all keys
FEATURE_BLOCK = 131072  # keys projected at a time (float64 GEMM)
BASIS_SLACK = 1 + 2.0 ** -30  # V's departure from orthonormality (float64 eigh) on D >= L


@dataclass(frozen=True)
class LowerBound:
    """The subspace (mean μ (d,), basis V (d, d) float64, first `dims` columns principal), the keys'
    features (N, dims + 1) float32 and the largest feature norm."""

    mean: np.ndarray
    basis: np.ndarray
    dims: int
    key_features: np.ndarray
    b_max: float
    share: float  # variance share of the first `dims` directions (on the sample)

    def features(self, x: np.ndarray) -> np.ndarray:
        """f(x) (n, dims + 1) float32 of rows x (n, d): computed in float64, rounded once."""
        return features(x, self.mean, self.basis, self.dims)


def features(x, mean: np.ndarray, basis: np.ndarray, dims: int) -> np.ndarray:
    """[Pᵀ(x − μ), ||P⊥ᵀ(x − μ)||] (n, dims + 1) float32, blocks of FEATURE_BLOCK rows in float64.

    ||P⊥ᵀz||² = ||z||² − ||Pᵀz||² (V orthonormal): one GEMM of `dims` columns, not d; in float64
    the subtraction loses ~1e-16 ||z||², far below the float32 rounding the bound allows for."""
    out = np.empty((len(x), dims + 1), dtype=np.float32)
    top = np.ascontiguousarray(basis[:, :dims])
    for a in range(0, len(x), FEATURE_BLOCK):
        z = np.asarray(x[a : a + FEATURE_BLOCK], dtype=np.float64) - mean  # (b, d)
        zp = z @ top  # (b, dims)
        out[a : a + len(z), :dims] = zp
        rest = np.einsum("ij,ij->i", z, z) - np.einsum("ij,ij->i", zp, zp)
        out[a : a + len(z), dims] = np.sqrt(np.maximum(rest, 0.0))
    return out


def fit_lower_bound(keys: np.ndarray, dims: int = DIMS, sample: int = SAMPLE, seed: int = 0) -> LowerBound | None:
    """The bound for these keys (float32 (N, d) in memory), or None when it would not pay: fewer
    than 2·dims dimensions, or the top `dims` directions hold under MIN_SHARE of the variance."""
    n, d = keys.shape
    if d < 2 * dims or n <= dims:
        return None
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, sample), replace=False))
    x = keys[rows].astype(np.float64)
    mean = x.mean(0)
    eigval, eigvec = np.linalg.eigh(np.cov((x - mean).T))  # ascending
    eigval, basis = eigval[::-1], np.ascontiguousarray(eigvec[:, ::-1])
    share = float(eigval[:dims].sum() / max(eigval.sum(), 1e-300))
    if share < MIN_SHARE:
        return None
    feats = features(keys, mean, basis, dims)
    b_max = float(np.sqrt(np.einsum("ij,ij->i", feats.astype(np.float64), feats.astype(np.float64)).max()))
    return LowerBound(mean, basis, dims, feats, b_max, share)


def projection_knn(queries: np.ndarray, keys: np.ndarray, k: int, lower: LowerBound, *,
                   shortlist: int | None = None, progress=None, stats: dict | None = None):
    """(r (Q, k) float32 ascending, ids (Q, k) int64) of the exact k nearest keys (module docstring).

    `keys` (N, d) float32 in memory (the rerank reads rows in place); `lower` from `fit_lower_bound`
    on the same keys; `shortlist` the first s (default max(SHORTLIST k, k + MIN_MARGIN))."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    n, d = keys.shape
    qf = lower.features(q)  # (Q, dims + 1)
    a_norm = np.sqrt(np.einsum("ij,ij->i", qf.astype(np.float64), qf.astype(np.float64)))
    error = faiss_error(lower.dims + 1)

    def one_pass(rows, s, prog):
        approx, cand = faiss.knn(qf[rows], lower.key_features, s)  # (q, s) ascending L̃, ids
        if prog:
            prog(n)
        import torch

        r = rerank_rows(q[rows], keys, cand)
        r_top, ids_top = select_top(r, torch.from_numpy(cand), min(k, n))
        big_r = rerank_bound(r_top[:, -1].double().numpy(), d) * BASIS_SLACK
        a = a_norm[rows]
        b = np.minimum(a + np.sqrt(big_r), lower.b_max)  # a key with D <= R has ||f(k)|| <= ||f(q)|| + √R
        t = approx[:, -1].astype(np.float64) - error(a, b)
        ok = (np.sqrt(np.maximum(t, 0.0)) - U32 * (a + b) * 2) ** 2 > big_r
        ok &= t > 0
        return r_top.numpy(), ids_top.numpy(), ok

    first = shortlist or max(SHORTLIST * k, k + MIN_MARGIN)
    return certified_search(q, n, k, first - k, one_pass, progress, stats)
