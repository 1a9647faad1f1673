"""Exact k-nearest-neighbour search over the stored keys (SPEC §8; contamination, SPEC §5).

Both devices give the same answer: the k keys of smallest r_j = Σ_i (k_ji − q_i)², summed in
float32 by the difference (no ||q||² + ||k||² − 2 q·k cancellation, `pair_sq_dists`), ties by the
lower id, with those r_j ascending (missing neighbours when k > N: id -1, distance +inf).

* torch (`shortlist_knn`: the GPU path; the same code runs on CPU torch in the tests): per
  key block one low-precision matmul (fp16, or bf16) gives approximate distances d̃; each
  query keeps the s = k + margin smallest d̃ over the blocks seen, and a key admitted to that
  shortlist has its r computed while its block is on the device (one pass over the keys).
* faiss (`faiss_knn`: the CPU path): `knnlm_core.metrics.exact_knn_with_dists` for the s
  keys of smallest faiss fp32 distance, then r of those s.

Why the answer is exact (the certificate, checked per query, not assumed). Let t̃ be the
largest approximate distance in the final shortlist: every key outside it has d̃ ≥ t̃. The
approximate distance has a rigorous error bound |d̃ − D| ≤ E(A, B) (D the exact distance,
A = ||q − c||, B = ||k − c||, c the centre; `lowp_error`, `faiss_error`). Let r_k be the k-th
smallest r among the candidates and R = r_k / (1 − γ_r), γ_r the relative error of an r.
A key outside with D ≤ R has B ≤ A + √R (triangle inequality), so D ≥ t̃ − E(A, A + √R);
hence when t̃ − E(A, A + √R) > R, every key outside has D > R, i.e. r > r_k, and the top-k by
(r, id) over the shortlist is the top-k by (r, id) over all keys. A query whose certificate
fails is searched again with a four times larger shortlist (until s = N, which is exact by
construction). So the result equals a float32 brute force by the difference, ties by id,
always; against float64 it differs only where two distances are within float32 rounding.

The margin. In distance, the margin is what the bound says: a key can belong to the true
top-k only if its d̃ ≤ D_k + E, so the shortlist must reach E past the k-th distance. In
count, `margin` is the capacity reserved for the keys in that band; it changes speed, never
the result: on the faiss path, margins of 32 and 160 took the same time at k = 1024.
`default_margin(k)` = k / 8 + 32, both paths. Queries a first shortlist could not certify
(k = 1024, this machine; torch on its CPU): faiss path none (none even with margin 16);
torch fp16: 0 of 64 on 200k x 1600 Gaussian keys (E ≈ 1.7e-3·A·B at d = 1600, no centring),
0 of 200 on 500k x 192 clustered keys, 45 of 64 on the Gaussian keys shifted by 30 (centred:
the inputs' rounding adds ~2/3 to E); bf16: all, on each (E ~8x fp16's). fp16 is the default.

Precision choices of the torch path: keys and queries are centred on the queries' mean when
that mean is large (`centre_of`), and scaled by powers of two (exact) so that no fp16 value or
product overflows; the inputs' rounding errors are measured, and B is capped by the largest key
norm seen; cuBLAS reduced-precision reductions are switched off during the matmuls (the bound
assumes float32 accumulation).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from knnlm_core.metrics import EXACT_BLOCK_BYTES
from knnlm_core.metrics import exact_knn_with_dists as faiss_shortlist

GPU_KEY_BLOCK = 1 << 18  # keys per block moved to the device: (4096 x 262144) float32 distances = 4.3 GB
QUERY_BLOCK = 4096  # queries per low-precision matmul
PAIR_CHUNK = 1 << 16  # (query, key) pairs reranked at a time on a GPU: (65536 x d) float32 differences
U32 = 2.0 ** -24  # float32 unit roundoff
U_ACC = 2.0 ** -23  # accumulation unit roundoff in a GEMM: 2x float32's, for one that truncates
SLACK = 1 + 2.0 ** -10  # on every bound: the bound's own float64 arithmetic and norms rounded in float32
NORM_CAP = 128.0  # scaled norms <= 2^7: every fp16 value and every |q'.k'| <= 2^14 stays finite
LOW_PRECISION = {  # dtype name -> (unit roundoff, largest rounding error of a subnormal)
    "float16": (2.0 ** -11, 2.0 ** -25),
    "bfloat16": (2.0 ** -8, 2.0 ** -134),
}


def default_margin(k: int) -> int:
    """Shortlist capacity past k of the low-precision path (module docstring: speed only, never the result)."""
    return k // 8 + 32


def exact_knn(queries: np.ndarray, keys, k: int, device: str = "cpu") -> np.ndarray:
    """Ids (Q, k) of the exact k nearest keys of each float32 query, on `device` ("cpu" or "cuda")."""
    if device == "cuda":
        return shortlist_knn(queries, keys, k, "cuda")[1]
    # 262,144-key faiss blocks: contamination calls this beside the types stage's arrays (measured peak RSS)
    return faiss_knn(queries, keys, k, block_bytes=262144 * 4 * keys.shape[1])[1]


def exact_knn_with_dists(queries: np.ndarray, keys, k: int, device: str = "cpu", progress=None,
                         lower=None) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances (Q, k) float32 ascending, ids (Q, k) int64) of the exact k nearest keys.
    On a CPU with `lower` (`precompute.exact_projection.fit_lower_bound` of these resident keys) the
    shortlist comes from the subspace bound, else from faiss's brute force: the same answer."""
    if device == "cuda":
        return shortlist_knn(queries, keys, k, "cuda", progress=progress)
    if lower is not None:
        from precompute.exact_projection import projection_knn

        return projection_knn(queries, keys, k, lower, progress=progress)
    return faiss_knn(queries, keys, k, progress=progress)


def exact_knn_torch(queries: np.ndarray, keys, k: int, device: str, block: int = GPU_KEY_BLOCK,
                    query_block: int = QUERY_BLOCK, with_dists: bool = False):
    """The torch path by its former name: ids (and distances first when `with_dists`)."""
    dists, ids = shortlist_knn(queries, keys, k, device, key_block=block, query_block=query_block)
    return (dists, ids) if with_dists else ids


# ---------------------------------------------------------------------------------------------- the shared parts


def pair_sq_dists(x, ix, y, iy):
    """r (P,) float32 = Σ (y[iy_j] − x[ix_j])² of P index pairs, summed by the difference.
    x (m, d), y (n, d) float32 tensors, ix, iy (P,) int64: faiss on CPU tensors, torch on a GPU."""
    return faiss_pair_sq_dists(x, ix, y, iy) if x.device.type == "cpu" else torch_pair_sq_dists(x, ix, y, iy)


def faiss_pair_sq_dists(x, ix, y, iy):
    """`pair_sq_dists` of CPU tensors by `pair_sq_dists_np`: ~5x torch's elementwise ops on a CPU."""
    import torch

    x, ix, y, iy = (t.contiguous().numpy() for t in (x, ix, y, iy))
    return torch.from_numpy(pair_sq_dists_np(x, ix, y, iy))


def pair_sq_dists_np(x: np.ndarray, ix: np.ndarray, y: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """r (P,) float32 = Σ (y[iy_j] − x[ix_j])² of P index pairs by faiss's `pairwise_indexed_L2sqr` (its SIMD
    fvec_L2sqr, by the difference; OpenMP over the pairs); +inf where an index is negative. x (m, d), y (n, d)
    C-contiguous float32, ix, iy (P,) int64. The pipeline's one exact-distance routine on a CPU
    (`precompute.search.neighbour_sq_dists` and the exact search's rerank)."""
    import faiss

    ix, iy = np.ascontiguousarray(ix, dtype=np.int64), np.ascontiguousarray(iy, dtype=np.int64)
    out = np.empty(len(ix), dtype=np.float32)
    faiss.pairwise_indexed_L2sqr(x.shape[1], len(ix), faiss.swig_ptr(x), faiss.swig_ptr(ix), faiss.swig_ptr(y),
                                 faiss.swig_ptr(iy), faiss.swig_ptr(out))
    return out


def torch_pair_sq_dists(x, ix, y, iy):
    """`pair_sq_dists` in torch on x's device, PAIR_CHUNK pairs at a time."""
    import torch

    out = torch.empty(len(ix), dtype=torch.float32, device=x.device)
    for a in range(0, len(ix), PAIR_CHUNK):
        rows = torch.index_select(y, 0, iy[a : a + PAIR_CHUNK])  # (p, d) copies
        rows.sub_(torch.index_select(x, 0, ix[a : a + PAIR_CHUNK]))
        rows.mul_(rows)
        torch.sum(rows, -1, out=out[a : a + PAIR_CHUNK])
    return out


def select_top(r, ids, k: int):
    """The k smallest (r, id) of each row of candidates (Q, s) -> (r (Q, k), ids (Q, k)), ascending.

    One sort of int64 keys (r's float32 bits, which order like the values for r >= 0, then the id's
    low 32 bits): ids below 2^31, as any key store's row numbers; a padding id -1 sorts last.
    """
    import torch

    order_key = (r.view(torch.int32).to(torch.int64) << 32) | (ids & 0xFFFFFFFF)
    order = torch.sort(order_key, dim=1).indices[:, :k]
    return torch.gather(r, 1, order), torch.gather(ids, 1, order)


def gamma(n: int, unit: float) -> float:
    """Higham's γ_n = n u / (1 − n u): relative error bound of a sum of n products."""
    return n * unit / (1 - n * unit)


def rerank_bound(r_k, d: int):
    """R = r_k / (1 − γ_r): an upper bound on the exact distance of a key whose float32 r is r_k."""
    return r_k / (1 - 2 * gamma(d + 2, U32))


def certified(t_approx, r_k, a_norm, error, d: int, b_max: float = math.inf):
    """Per query: True where no key outside the shortlist can enter the top-k (module docstring).

    `t_approx` the largest approximate distance in the shortlist, `r_k` the k-th smallest r,
    `a_norm` = A, `error(A, B)` the approximate distance's error bound (float64 tensors), `b_max`
    the largest B of any key when known (in high dimension far below A + √R).
    """
    big_r = rerank_bound(r_k.double(), d)
    b = (a_norm + big_r.sqrt()).clamp(max=b_max)
    return t_approx.double() - error(a_norm, b) > big_r


def padded(dists, ids, k: int):
    """(dists (Q, k), ids (Q, k)) numpy, rows with fewer than k keys padded with +inf / -1."""
    q, have = ids.shape
    out_d = np.full((q, k), np.inf, dtype=np.float32)
    out_i = np.full((q, k), -1, dtype=np.int64)
    out_d[:, :have], out_i[:, :have] = dists, ids
    return out_d, out_i


def certified_search(queries: np.ndarray, n_keys: int, k: int, margin: int, one_pass, progress=None,
                     stats: dict | None = None):
    """Run `one_pass(rows, s, progress)` -> (r (q, k'), ids (q, k'), certified (q,)) until every
    query is certified, the shortlist growing 4x for the queries that were not. Returns
    ((Q, k) float32 distances, (Q, k) int64 ids); `stats` (if given) receives "extra_passes" and
    "requeried" (queries the first shortlist could not certify)."""
    q_all = len(queries)
    kk = min(k, n_keys)
    out_d = np.empty((q_all, kk), dtype=np.float32)
    out_i = np.empty((q_all, kk), dtype=np.int64)
    todo, s, passes, requeried = np.arange(q_all), min(k + margin, n_keys), 0, 0
    while len(todo) and kk:
        r, ids, ok = one_pass(todo, s, progress if passes == 0 else None)
        ok = np.ones(len(todo), dtype=bool) if s >= n_keys else ok
        out_d[todo[ok]], out_i[todo[ok]] = r[ok], ids[ok]
        requeried += int((~ok).sum()) if passes == 0 else 0
        todo, s, passes = todo[~ok], min(4 * s, n_keys), passes + 1
    if stats is not None:
        stats.update(extra_passes=max(passes - 1, 0), requeried=requeried)
    return padded(out_d, out_i, k)


# ---------------------------------------------------------------------------------------------- CPU: faiss


def faiss_error(d: int):
    """E(A, B) of faiss's float32 distance fl(||q||² + ||k||² − 2 q·k) (or its direct Σ (q − k)²)."""
    g = gamma(d, U_ACC)

    def error(a, b):
        return (g + 3 * U32) * (a + b) ** 2 * SLACK

    return error


def faiss_knn(queries: np.ndarray, keys, k: int, *, margin: int | None = None, block_bytes: int = EXACT_BLOCK_BYTES,
              progress=None, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The CPU path: faiss's s = k + margin nearest, reranked by `pair_sq_dists` and certified."""
    import torch

    q = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, d)
    n, d = keys.shape
    a_norm = torch.from_numpy(q).double().norm(dim=1)
    error = faiss_error(d)

    def one_pass(rows, s, prog):
        approx, cand = faiss_shortlist(q[rows], keys, s, prog, block_bytes=block_bytes)  # (q, s), ascending
        r = rerank_rows(q[rows], keys, cand)
        r_top, ids_top = select_top(r, torch.from_numpy(cand), min(k, n))
        ok = certified(torch.from_numpy(approx[:, -1]), r_top[:, -1], a_norm[rows], error, d)
        return r_top.numpy(), ids_top.numpy(), ok.numpy()

    return certified_search(q, n, k, default_margin(k) if margin is None else margin, one_pass, progress, stats)


def rerank_rows(q: np.ndarray, keys, cand: np.ndarray):
    """r (Q, s) float32 tensor of each query and its candidate keys (Q, s) ids into `keys`: a float32
    array in memory is read in place; a memmap (fp16 store) once per distinct row, in row order."""
    import torch

    if type(keys) is np.ndarray and keys.dtype == np.float32 and keys.flags.c_contiguous:
        cand_keys, key_rows = torch.from_numpy(keys), torch.from_numpy(cand.reshape(-1))
    else:
        rows, inverse = np.unique(cand, return_inverse=True)  # sorted rows: a forward read of the key store
        cand_keys = torch.from_numpy(np.ascontiguousarray(keys[rows], dtype=np.float32))  # (u, d)
        key_rows = torch.from_numpy(inverse.reshape(-1))
    pair_query = torch.arange(len(q)).repeat_interleave(cand.shape[1])  # (Q s,)
    return pair_sq_dists(torch.from_numpy(q), pair_query, cand_keys, key_rows).view(cand.shape)


# ---------------------------------------------------------------------------------------------- torch: shortlist


def lowp_error(d: int, dtype: str, q_scale: float, k_scale: float, dq, rho: float):
    """E(A, B) of the low-precision distance fl(||k̂||² − 2·s·low(q'·k')) + ||q̂||².

    q̂ = fl(q − c), k̂ = fl(k − c) (float32; c = 0 when not centring); q' = low(q̂ / q_scale),
    k' = low(k̂ / k_scale), their product accumulated in float32 (γ_d with U_ACC) and rounded to
    the low dtype. The inputs' rounding is measured, not bounded: `dq` (per query) = ||q'·q_scale − q̂||,
    `rho` = the largest ||k'·k_scale − k̂|| / ||k̂|| over all keys (both 0 for fp16 data not centred).
    Terms: centring (2u·AB), input rounding, accumulation, output rounding (and its subnormals),
    float32 norms and the final float32 operations.
    """
    unit, tiny = LOW_PRECISION[dtype]
    g = gamma(d, U_ACC)

    def error(a, b):
        qn, kn = a + dq, b * (1 + rho)  # >= ||q'||, ||k'|| in unscaled units
        dot = (unit * (1 + g) + g) * qn * kn + tiny * q_scale * k_scale + dq * kn + a * rho * b + 2 * U32 * a * b
        norms = (g + 3 * U32) * (a * a + b * b)
        final = 2 * U32 * (a * a + b * b + 2 * qn * kn) * (1 + g)
        return (norms + 2 * dot + final) * SLACK

    return error


def power_of_two_at_least(x: float) -> float:
    """Smallest 2^e >= x / NORM_CAP (1 for x = 0): dividing by it keeps norms <= NORM_CAP exactly."""
    if x <= 0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(x / NORM_CAP))


@contextmanager
def float32_accumulation():
    """cuBLAS without reduced-precision (fp16 / bf16) reductions in fp16 / bf16 GEMMs; restored after."""
    import torch

    mm = torch.backends.cuda.matmul
    saved = mm.allow_fp16_reduced_precision_reduction, mm.allow_bf16_reduced_precision_reduction
    mm.allow_fp16_reduced_precision_reduction = mm.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        mm.allow_fp16_reduced_precision_reduction, mm.allow_bf16_reduced_precision_reduction = saved


def shortlist_knn(queries: np.ndarray, keys, k: int, device: str, *, margin: int | None = None,
                  key_block: int = GPU_KEY_BLOCK, query_block: int = QUERY_BLOCK, low_dtype: str = "float16",
                  progress=None, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The torch path on `device`: low-precision shortlist, float32 rerank, certificate (module docstring).

    `keys` (N, d): a numpy array / memmap (streamed block by block) or a torch tensor.
    `stats` (optional dict) receives "extra_passes" and "requeried" (`certified_search`).
    """
    import torch

    q32 = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, d)
    n, d = keys.shape
    qt = torch.from_numpy(q32).to(device)
    centre = centre_of(qt)  # (d,)
    q_hat = qt - centre  # (Q, d) float32
    a_norm = q_hat.double().norm(dim=1)  # (Q,)

    def one_pass(rows, s, prog):
        rows_t = torch.from_numpy(rows).to(device)
        shortlist = Shortlist(qt[rows_t], q_hat[rows_t], s, low_dtype)
        for start in range(0, n, key_block):
            block = key_rows(keys, start, min(start + key_block, n), device)  # (b, d) float32
            shortlist.add_block(block, block - centre, start, query_block)
            if prog:
                prog(len(block))
        r_top, ids_top = select_top(shortlist.r, shortlist.ids, min(k, n))
        error = lowp_error(d, low_dtype, shortlist.q_scale, shortlist.k_scale, shortlist.dq, shortlist.rho)
        t_approx = shortlist.approx.max(dim=1).values.double() + shortlist.q_sq.double()
        ok = certified(t_approx, r_top[:, -1], a_norm[rows_t], error, d, shortlist.b_max)
        return r_top.cpu().numpy(), ids_top.cpu().numpy(), ok.cpu().numpy()

    with float32_accumulation():
        return certified_search(q32, n, k, default_margin(k) if margin is None else margin, one_pass, progress,
                                stats)


def centre_of(q):
    """The queries' mean when it is large (||mean||² > half the mean ||q − mean||²: GPT-2-like keys share
    big constant components, which would dominate A and B), else 0: fp16 keys and queries then enter
    the matmul exactly, with no input rounding (the bound's largest term when centred)."""
    import torch

    if not len(q):
        return torch.zeros(q.shape[1], device=q.device)
    mean = q.double().mean(0)
    spread = ((q.double() - mean) ** 2).sum(1).mean()
    return mean.float() if float((mean * mean).sum()) > float(spread) / 2 else torch.zeros_like(mean, dtype=q.dtype)


def key_rows(keys, lo: int, hi: int, device: str):
    """Keys [lo, hi) as a float32 tensor on `device` (fp16 values convert exactly)."""
    import torch

    if isinstance(keys, torch.Tensor):
        return keys[lo:hi].to(device).float()
    return torch.from_numpy(np.ascontiguousarray(keys[lo:hi])).to(device).float()


class Shortlist:
    """Per query, the s keys of smallest approximate distance seen so far, with their exact r.

    approx (Q, s) float32 d̃, ids (Q, s) int64 (-1 before s keys were seen), r (Q, s) float32.
    """

    def __init__(self, q, q_hat, s: int, low_dtype: str):
        import torch

        self.q, self.s, self.dtype = q, s, getattr(torch, low_dtype)
        self.q_scale = power_of_two_at_least(float(q_hat.norm(dim=1).max())) if len(q) else 1.0
        self.q_low = (q_hat / self.q_scale).to(self.dtype)  # (Q, d)
        self.dq = (self.q_low.float() * self.q_scale - q_hat).double().norm(dim=1)  # (Q,) rounding, measured
        self.q_sq = (q_hat * q_hat).sum(1)  # (Q,) float32 ||q̂||²
        self.k_scale, self.rho, self.b_max = 1.0, 0.0, 0.0  # over the keys seen: largest scale, rounding, ||k̂||
        self.approx = torch.full((len(q), s), float("inf"), device=q.device)
        self.ids = torch.full((len(q), s), -1, dtype=torch.int64, device=q.device)
        self.r = torch.full((len(q), s), float("inf"), device=q.device)

    def add_block(self, block, k_hat, start: int, query_block: int) -> None:
        """Merge key block [start, start + b) (float32 keys and centred keys (b, d)) into every query's list."""
        import torch

        low_keys = self.low_keys(k_hat)
        kk = min(self.s, len(block))
        for a in range(0, len(self.q), query_block):
            e = min(a + query_block, len(self.q))
            top_d, top_i = torch.topk(self.approx_dists(a, e, *low_keys), kk, dim=1, largest=False, sorted=False)
            self.merge(a, e, top_d, top_i + start)
        self.rerank_admitted(block, start)

    def low_keys(self, k_hat):
        """(k' (b, d) low precision, ||k̂||² (b,) float32, the block's power-of-two scale) of centred keys."""
        k_sq = (k_hat * k_hat).sum(1)
        k_norm = k_sq.double().sqrt()  # (b,)
        scale = power_of_two_at_least(float(k_norm.max()))
        k_low = (k_hat / scale).to(self.dtype)
        rounding = (k_low.float() * scale - k_hat).double().norm(dim=1)  # (b,) ||k'·scale − k̂||, measured
        self.rho = max(self.rho, float((rounding / k_norm.clamp(min=1e-300)).max()))
        self.k_scale, self.b_max = max(self.k_scale, scale), max(self.b_max, float(k_norm.max()))
        return k_low, k_sq, scale

    def approx_dists(self, a: int, e: int, k_low, k_sq, scale: float):
        """d̃ − ||q̂||² (e - a, b) float32 of queries [a, e) and a block: ||k̂||² − 2·scales·low(q'·k').

        The per-query ||q̂||² does not change which keys a query keeps; it is added when certifying.
        One kernel: the low-precision product times a power of two is exact in float32, then one rounding.
        """
        import torch

        dot = torch.mm(self.q_low[a:e], k_low.T)  # (q, b) low precision
        return torch.add(k_sq[None, :], dot, alpha=-2 * self.q_scale * scale)

    def merge(self, a: int, e: int, top_d, top_ids) -> None:
        """Keep the s smallest of the running list and a block's candidates (new ones: r = NaN)."""
        import torch

        cat_d = torch.cat([self.approx[a:e], top_d], 1)
        cat_i = torch.cat([self.ids[a:e], top_ids], 1)
        cat_r = torch.cat([self.r[a:e], torch.full_like(top_d, float("nan"))], 1)
        sel_d, sel = torch.topk(cat_d, self.s, dim=1, largest=False, sorted=False)
        self.approx[a:e], self.ids[a:e], self.r[a:e] = sel_d, torch.gather(cat_i, 1, sel), torch.gather(cat_r, 1, sel)

    def rerank_admitted(self, block, start: int) -> None:
        """r of the keys this block placed in the lists, computed from the block while it is on the device."""
        import torch

        rows, cols = torch.nonzero(torch.isnan(self.r), as_tuple=True)
        self.r[rows, cols] = pair_sq_dists(self.q, rows, block, self.ids[rows, cols] - start)
