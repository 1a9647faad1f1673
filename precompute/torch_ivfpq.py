"""IVFPQ search in torch over a faiss index's own lists and codes (SPEC §2; issue 23 item 4): the search
stage's GPU path without faiss-gpu, and on CPU torch its twin in CI.

`TorchIVFPQ.from_faiss(index, device)` copies out of a trained, filled faiss `IndexIVFPQ` (L2,
by_residual, 8-bit PQ codes, flat coarse quantizer; optionally behind orthonormal linear transforms
such as OPQ): the coarse centroids, the PQ codebooks and every inverted list (codes and ids,
concatenated list after list). `search` then does what faiss's `IndexIVFPQ.search` does:
* coarse: ||y||² + ||c||² − 2 y·c, clamped at 0 (faiss's BLAS path), the nprobe nearest lists;
* the lookup tables in the form faiss uses for the index: the *precomputed-table* form when
  `use_precomputed_table == 1` (faiss's default for these indexes): ||y − c − p||² = ||y − c||²
  + (||p||² + 2 c·p) − 2 y·p, the middle term faiss's per-list table (nlist, M, ksub); here it is
  summed over each entry's codes once, at load (`term`, (N,)), and each query needs one table
  y·p (M, ksub) for all its lists; else the *direct* form: per (query, probed list) a table
  ||(y − c) − p||² (M, ksub), as faiss's `compute_distance_table`;
* ADC: distance = Σ_m table[m, code_m] (plus the coarse distance and the entry's term in the
  precomputed form), top-k over all codes of the probed lists; missing neighbours (fewer than k
  codes probed) are id −1, distance +inf.
Distances equal faiss's up to float32 rounding (torch matmuls instead of faiss's BLAS calls; in the
precomputed form faiss sums (table − 2 y·p) per m, here the two sums apart); ids are faiss's except
where two distances are within that rounding. Ties are returned in (distance, id) order: faiss's
order among exact ties (its heap) is not reproduced.

Memory per batch of B queries (the bound the batch size is chosen by): the lookup tables,
`table_bytes` (B · M · ksub · 4 bytes, times nprobe in the direct form, up to three times that while
the direct form builds them), plus about 2·M + 100 bytes for each of at most `max_pairs` (query, code) pairs (codes, row and
table indices, sums, the padded (B, longest) rows), where a batch holds B · (the nprobe largest
lists' total size) pairs at most: ~1 GB at M = 64 with the defaults. The index itself costs N · (M + 8)
bytes (codes and ids) and, in the precomputed form, N · 4 bytes of terms and nlist · M · ksub · 4
bytes of tables (268 MB at IVF4096,PQ64, as in faiss).

`faiss_gpu_search` is the faiss-gpu path (when `faiss.get_num_gpus() > 0`): its rows are sorted by
(distance, id) and checked ascending, since faiss-gpu has returned unsorted neighbours.
torch and faiss are imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TABLE_BYTES = 256 << 20  # lookup tables of one batch: B * nprobe * M * ksub * 4 bytes at most
MAX_PAIRS = 1 << 22  # (query, code) pairs of one batch at most (~1 GB at M = 64)
DIRECT_BELOW = 16  # sub-vectors shorter than this: direct tables summed by difference (faiss's loop)
GPU_MAX_K = 2048  # faiss-gpu's limit on k
MIN_OVERLAP = 0.99  # check_against_faiss: mean share of faiss's ids that the torch search also returns
# check_against_faiss: |d_torch - d_faiss| <= TOL * (||y||² + |d_faiss|), rank by rank. Each distance is a
# float32 sum of M + 1 terms, each from dot products of dsub floats, all bounded by ~||y||² + |d|: rounding
# <= ~(M + dsub + 2) * 2^-24 of that (5e-6 at PQ64, d = 768; measured 3e-7 at PQ8, d = 32): a 20x margin.
TOL = 1e-4


class TorchIVFPQError(ValueError):
    """The index cannot be searched in torch, or the torch search disagrees with faiss (one line)."""


def _ivfpq(index) -> Any:
    """The IndexIVFPQ inside `index` (concrete class), or TorchIVFPQError naming what it is instead."""
    import faiss

    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        ivf = None
    name = type(ivf if ivf is not None else faiss.downcast_index(index)).__name__
    if type(ivf) is not faiss.IndexIVFPQ:  # IndexIVFPQR (a refine step) and fast-scan indexes differ
        raise TorchIVFPQError(f"torch IVFPQ search supports IVF<n>,PQ<m> (optionally OPQ) indexes, not {name}: "
                              f"search this index with faiss (search device cpu)")
    problems = [(not ivf.is_trained, "it is not trained"), (ivf.metric_type != faiss.METRIC_L2, "metric is not L2"),
                (not ivf.by_residual, "PQ does not encode residuals"), (ivf.pq.nbits != 8, f"PQ codes have "
                f"{ivf.pq.nbits} bits, not 8"), (ivf.polysemous_ht != 0, "polysemous filtering is on"),
                (ivf.use_precomputed_table not in (-1, 0, 1), "tables are of the multi-index kind"),
                (ivf.invlists.code_size != ivf.pq.M, "inverted lists are not plain codes")]
    for bad, why in problems:
        if bad:
            raise TorchIVFPQError(f"torch IVFPQ search cannot reproduce this {name}: {why}; search it with faiss "
                                  f"(search device cpu)")
    return ivf


def _lists(ivf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (N, M) uint8, ids (N,) int64, offsets (nlist + 1,) int64) of every inverted list, concatenated."""
    from faiss.contrib.inspect_tools import get_invlist

    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])  # (nlist + 1,)
    codes = np.empty((offsets[-1], ivf.pq.M), dtype=np.uint8)  # (N, M)
    ids = np.empty(offsets[-1], dtype=np.int64)  # (N,)
    for i in np.flatnonzero(sizes):
        list_ids, list_codes = get_invlist(invlists, int(i))
        ids[offsets[i] : offsets[i + 1]] = list_ids
        codes[offsets[i] : offsets[i + 1]] = list_codes
    return codes, ids, offsets


@dataclass
class TorchIVFPQ:
    """A faiss IVFPQ index's arrays as torch tensors on `device`, searched like faiss (module docstring)."""

    device: str
    transforms: list  # [(A (d_out, d_in), b (d_out,))] applied in order: y = x A^T + b
    centroids: Any  # (nlist, d) float32 coarse centroids
    centroid_sq: Any  # (nlist,) float32 ||c||²
    pq: Any  # (M, ksub, dsub) float32 PQ codebooks
    pq_sq: Any  # (M, ksub) float32 ||p||²
    table: Any  # (nlist, M, ksub) float32 ||p||² + 2 c·p (precomputed form), or None (direct form)
    codes: Any  # (N, M) uint8, list after list
    ids: Any  # (N,) int64 the entries' ids
    offsets: Any  # (nlist + 1,) int64: list i is codes[offsets[i]:offsets[i + 1]]
    term: Any = None  # (N,) float32 Σ_m table[list, m, code_m] of each entry (precomputed form; made if None)

    def __post_init__(self):
        if self.table is not None and self.term is None:
            self.term = self.entry_terms()

    def entry_terms(self):
        """(N,) float32: each entry's query-independent part Σ_m (||p_m||² + 2 c·p_m), summed in m order."""
        import torch

        nlist, m, ksub = self.table.shape
        sizes = self.offsets[1:] - self.offsets[:-1]
        base = torch.repeat_interleave(torch.arange(nlist, device=self.codes.device) * (m * ksub), sizes)  # (N,)
        flat, term = self.table.reshape(-1), torch.zeros(len(base), device=self.codes.device)
        for j in range(m):
            term += flat.index_select(0, base + j * ksub + self.codes[:, j].long())
        return term

    @classmethod
    def from_faiss(cls, index, device: str = "cpu", precomputed: bool | None = None) -> TorchIVFPQ:
        """Copy a trained, filled faiss IVFPQ index (plain or behind orthonormal transforms) onto `device`.
        `precomputed` picks the table form; None: the one faiss uses for this index."""
        import torch

        from knnlm_core.index import ivfpq_codec

        ivf = _ivfpq(index)
        codec = ivfpq_codec(index)
        if codec is None:
            raise TorchIVFPQError("torch IVFPQ search supports only orthonormal pre-transforms (OPQ) and a flat "
                                  "coarse quantizer: search this index with faiss (search device cpu)")
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
        codes, ids, offsets = _lists(ivf)
        centroids, pq = t(codec.centroids), t(codec.pq_centroids)
        m, ksub, dsub = pq.shape
        pq_sq = (pq * pq).sum(2)  # (M, ksub)
        if precomputed is None:
            precomputed = ivf.use_precomputed_table == 1
        table = None
        if precomputed:  # faiss: r_norms + 2 <c, p>, per list
            from precompute.encode import ieee_float32

            with ieee_float32():
                dots = torch.einsum("lmd,mkd->lmk", centroids.view(len(centroids), m, dsub), pq)  # (nlist, M, ksub)
            table = pq_sq[None] + 2.0 * dots
        return cls(device=device, transforms=[(t(a), t(b)) for a, b in codec.transforms], centroids=centroids,
                   centroid_sq=(centroids * centroids).sum(1), pq=pq, pq_sq=pq_sq, table=table,
                   codes=torch.from_numpy(codes).to(device), ids=torch.from_numpy(ids).to(device),
                   offsets=torch.from_numpy(offsets).to(device))

    @property
    def ntotal(self) -> int:
        """Number of entries in the lists."""
        return int(self.ids.shape[0])

    def batch_size(self, nprobe: int, table_bytes: int = TABLE_BYTES, max_pairs: int = MAX_PAIRS) -> int:
        """Queries per batch: their tables (B · M · ksub floats, times nprobe in the direct form) <= table_bytes
        and B · (the nprobe largest lists' total size) <= max_pairs."""
        m, ksub, _ = self.pq.shape
        sizes = (self.offsets[1:] - self.offsets[:-1]).cpu().numpy()
        worst = int(np.sort(sizes)[::-1][:nprobe].sum())  # codes one query can scan at most
        per_query = m * ksub * 4 * (1 if self.table is not None else nprobe)
        return max(1, min(table_bytes // per_query, max_pairs // max(worst, 1)))

    def search(self, queries: np.ndarray, k: int, nprobe: int, table_bytes: int = TABLE_BYTES,
               max_pairs: int = MAX_PAIRS) -> tuple[np.ndarray, np.ndarray]:
        """(dists (Q, k) float32 ascending, +inf for missing; ids (Q, k) int64, -1 for missing) of float32
        queries (Q, d), probing the `nprobe` nearest lists, in batches bounded as in the module docstring."""
        import torch

        from precompute.encode import ieee_float32

        q = np.ascontiguousarray(queries, dtype=np.float32)
        d_in = self.transforms[0][0].shape[1] if self.transforms else self.centroids.shape[1]
        if q.ndim != 2 or q.shape[1] != d_in:
            raise TorchIVFPQError(f"queries have shape {q.shape}, the index wants (Q, {d_in})")
        if k < 1 or nprobe < 1:
            raise TorchIVFPQError(f"k ({k}) and nprobe ({nprobe}) must be >= 1")
        nprobe = min(nprobe, len(self.centroids))  # as faiss
        batch = self.batch_size(nprobe, table_bytes, max_pairs)
        dists, ids = np.full((len(q), k), np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        if self.ntotal == 0:
            return dists, ids
        with ieee_float32(), torch.no_grad():
            for a in range(0, len(q), batch):
                x = torch.from_numpy(q[a : a + batch]).to(self.device)
                d, i = self._search_batch(x, k, nprobe)
                dists[a : a + len(x)], ids[a : a + len(x)] = d.cpu().numpy(), i.cpu().numpy()
        return dists, ids

    def _transform(self, x):
        """Queries (B, d_in) in the IVF's space (B, d): the pre-transforms, as faiss's LinearTransform."""
        import torch

        for a, b in self.transforms:
            x = torch.addmm(b, x, a.T)
        return x

    def _coarse(self, y, nprobe: int):
        """(coarse distances (B, nprobe) ascending, lists (B, nprobe) int64): faiss's flat L2 quantizer (BLAS form)."""
        import torch

        dis = (y * y).sum(1, keepdim=True) + self.centroid_sq[None, :] - 2.0 * (y @ self.centroids.T)  # (B, nlist)
        dis.clamp_(min=0.0)  # faiss: "negative values can occur for identical vectors due to roundoff"
        return torch.topk(dis, nprobe, dim=1, largest=False, sorted=True)

    def _tables(self, y, lists):
        """Direct-form lookup tables (B·nprobe, M, ksub): ||(y - c) - p||² of each (query, probed list)."""
        import torch

        m, ksub, dsub = self.pq.shape
        b, nprobe = lists.shape
        r = (y[:, None, :] - self.centroids[lists]).view(b * nprobe, m, dsub)  # (B·nprobe, M, dsub) residuals
        if dsub < DIRECT_BELOW:  # Σ_j (r_j - p_j)², one component at a time (faiss's fvec_L2sqr_ny)
            tab = torch.zeros(b * nprobe, m, ksub, device=y.device)
            for j in range(dsub):
                diff = r[:, :, None, j] - self.pq[None, :, :, j]  # (B·nprobe, M, ksub)
                tab += diff * diff
            return tab
        dots = torch.einsum("nmd,mkd->nmk", r, self.pq)
        return (r * r).sum(2)[:, :, None] + self.pq_sq[None] - 2.0 * dots

    def _search_batch(self, x, k: int, nprobe: int):
        """(dists (B, k), ids (B, k)) of one batch of queries (B, d_in) on the device."""
        import torch

        dev = x.device
        y = self._transform(x)  # (B, d)
        coarse, lists = self._coarse(y, nprobe)  # (B, nprobe) each
        m, ksub, dsub = self.pq.shape
        b = len(y)
        # Flatten (query, probed list, code) into P pairs: pair p scans code row `rows[p]` of segment `seg[p]`.
        first = self.offsets[lists].reshape(-1)  # (S,) first code row of each segment (S = B · nprobe)
        sizes = (self.offsets[lists + 1] - self.offsets[lists]).reshape(-1)  # (S,)
        seg = torch.repeat_interleave(torch.arange(b * nprobe, device=dev), sizes)  # (P,)
        rows = torch.arange(len(seg), device=dev)
        rows += (first - (torch.cumsum(sizes, 0) - sizes)).index_select(0, seg)  # (P,) code row of each pair
        codes = self.codes.index_select(0, rows).T.contiguous()  # (M, P) uint8: each m's codes contiguous
        if self.table is not None:  # precomputed form: one table y·p per query, the rest per entry / segment
            flat = torch.einsum("bmd,mkd->bmk", y.view(b, m, dsub), self.pq).reshape(-1)  # (B·M·ksub,)
            base = torch.arange(b, device=dev).repeat_interleave(nprobe).index_select(0, seg) * (m * ksub)  # (P,)
            start = coarse.reshape(-1).index_select(0, seg) + self.term.index_select(0, rows)  # (P,)
        else:  # direct form: one table per (query, list)
            tab = self._tables(y, lists)  # (S, M, ksub)
            flat, base, start = tab.reshape(-1), seg * (m * ksub), None
        acc, idx = torch.empty(len(seg), device=dev), torch.empty_like(base)  # (P,) each
        for j in range(m):  # acc = Σ_m table[m, code_m], in m order
            torch.add(base, codes[j], out=idx)
            if j == 0:
                torch.index_select(flat, 0, idx, out=acc)
            else:
                acc += flat[j * ksub :].index_select(0, idx)
        if start is not None:
            acc = torch.add(start, acc, alpha=-2.0)  # ||y - c||² + Σ (||p||² + 2 c·p) - 2 Σ y·p
        # Scatter each query's pairs into a padded row (B, width) and take the k smallest.
        per_query = sizes.view(b, nprobe).sum(1)  # (B,)
        width = max(int(per_query.max()) if b else 0, 1)
        shift = torch.arange(b, device=dev) * width - (torch.cumsum(per_query, 0) - per_query)  # (B,)
        pos = torch.arange(len(seg), device=dev)
        pos += shift.repeat_interleave(nprobe).index_select(0, seg)  # (P,) place of each pair in the (B, width) rows
        mat = torch.full((b * width,), float("inf"), device=dev).index_copy_(0, pos, acc).view(b, width)
        rowm = torch.full((b * width,), -1, dtype=torch.int64, device=dev).index_copy_(0, pos, rows).view(b, width)
        kk = min(k, width)
        top_d, where = torch.topk(mat, kk, dim=1, largest=False, sorted=True)  # (B, kk)
        top_rows = rowm.gather(1, where)
        top_i = torch.where(top_rows >= 0, self.ids[top_rows.clamp(min=0)], -1)
        top_d, top_i = sort_rows_torch(top_d, top_i)
        top_i[torch.isinf(top_d)] = -1
        if kk < k:  # fewer codes probed than k: pad as faiss (id -1, distance +inf here)
            top_d = torch.nn.functional.pad(top_d, (0, k - kk), value=float("inf"))
            top_i = torch.nn.functional.pad(top_i, (0, k - kk), value=-1)
        return top_d, top_i


def sort_rows_torch(dists, ids):
    """Rows of (dists, ids) tensors sorted by (distance, id): stable sort by id, then by distance."""
    import torch

    by_id = torch.sort(ids, dim=1, stable=True).indices
    d, i = dists.gather(1, by_id), ids.gather(1, by_id)
    by_d = torch.sort(d, dim=1, stable=True).indices
    return d.gather(1, by_d), i.gather(1, by_d)


def sort_rows(dists: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row sorted by (distance, id), missing neighbours (id < 0) last as (+inf, -1); TorchIVFPQError
    unless every row is then ascending (e.g. NaN distances)."""
    d = np.where(ids < 0, np.inf, dists).astype(np.float32)
    order = np.lexsort((ids, d), axis=1) if d.size else np.zeros(d.shape, dtype=np.int64)
    d, i = np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)
    i = np.where(np.isinf(d), -1, i)
    if d.shape[1] > 1 and not np.all(d[:, 1:] >= d[:, :-1]):
        bad = int(np.flatnonzero(~np.all(d[:, 1:] >= d[:, :-1], axis=1))[0])
        raise TorchIVFPQError(f"faiss-gpu returned row {bad} not ascending after sorting (NaN distances?): "
                              f"search with the torch path (TorchIVFPQ) or on CPU")
    return d, i


def to_faiss_gpu(index, device: int = 0):
    """A faiss-gpu copy of a CPU index (only with faiss-gpu installed and a GPU seen)."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        raise TorchIVFPQError("faiss sees no GPU (faiss-gpu not installed?): use TorchIVFPQ.from_faiss(index, 'cuda')")
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, device, index)
    gpu.referenced_resources = res  # keep the resources alive with the index
    return gpu


def faiss_gpu_search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(dists (Q, k) float32, +inf missing; ids (Q, k) int64, -1 missing) of a faiss(-gpu) index, each row
    sorted by (distance, id) and checked ascending (faiss-gpu has returned unsorted rows)."""
    if k > GPU_MAX_K:
        raise TorchIVFPQError(f"faiss-gpu searches k <= {GPU_MAX_K}, not {k}: use TorchIVFPQ (no limit on k)")
    dists, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), k)
    return sort_rows(dists, ids)


def _faiss_search(index, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's own search at `nprobe` (set on the IVF and restored), missing as (+inf, -1)."""
    import faiss

    from knnlm_core.index import search

    ivf = faiss.extract_index_ivf(index)
    saved, ivf.nprobe = ivf.nprobe, nprobe
    try:
        return search(index, q, k)
    finally:
        ivf.nprobe = saved


def compare(want: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray],
            scale: np.ndarray) -> tuple[float, float]:
    """(mean share of faiss's ids per row also in torch's row, largest |Δ distance| / (scale + |d_faiss|) rank
    by rank where both have a neighbour), of faiss's (`want`) and torch's (`got`) (dists, ids), (Q, k) each."""
    (wd, wi), (gd, gi) = want, got
    shares = []
    for w, g in zip(wi, gi, strict=True):
        w = w[w >= 0]
        shares.append(1.0 if len(w) == 0 else len(np.intersect1d(w, g[g >= 0])) / len(w))
    both = np.isfinite(wd) & np.isfinite(gd)
    rows = np.nonzero(both)[0]
    rel = np.abs(gd[both].astype(np.float64) - wd[both]) / (scale[rows] + np.abs(wd[both]))
    return float(np.mean(shares)) if shares else 1.0, float(rel.max()) if rel.size else 0.0


def check_against_faiss(index, tindex: TorchIVFPQ, queries: np.ndarray, k: int, nprobe: int, tol: float = TOL,
                        sample: int = 256, min_overlap: float = MIN_OVERLAP) -> None:
    """TorchIVFPQError (a ValueError, one line) unless torch and faiss agree on the first `sample` queries:
    mean id overlap >= min_overlap and rank-by-rank distances within tol · (||y||² + |d_faiss|), y the
    query in the IVF's space (float32 rounding of sums of products of that size)."""
    import torch

    q = np.ascontiguousarray(queries[:sample], dtype=np.float32)  # (S, d)
    want = _faiss_search(index, q, k, nprobe)
    got = tindex.search(q, k, nprobe)
    with torch.no_grad():
        y = tindex._transform(torch.from_numpy(q).to(tindex.device))
        scale = (y * y).sum(1).double().cpu().numpy()  # (S,) ||y||²
    overlap, worst = compare(want, got, scale)
    if overlap < min_overlap or worst > tol:
        raise TorchIVFPQError(
            f"torch IVFPQ search differs from faiss on {len(q)} queries (k={k}, nprobe={nprobe}): id overlap "
            f"{overlap:.4f} (need >= {min_overlap}), largest distance difference {worst:.2e} of ||q||² + d "
            f"(tolerance {tol:.0e}); rebuild it with TorchIVFPQ.from_faiss on this very index file, or search "
            f"with faiss (search device cpu)")
