"""IVFPQ encoding in torch (SPEC §2, §5 PQ error): faiss's `sa_encode` codes and the per-entry PQ error
of `knnlm_core.index.encode_with_error`, computed on a GPU (or, in the tests, on CPU torch).

The arithmetic is two nearest-centroid searches: the coarse list of each key (one matmul
against the nlist centroids) and, per sub-quantizer, the nearest PQ centroid of the residual
(one batched matmul). Each distance is computed the way faiss computes it, so the codes are
faiss's except where two centroids are within float32 rounding of each other (near-ties,
which faiss itself resolves by summation order):
* coarse: ||c||² − 2 x·c (faiss adds ||x||², which changes no argmin but its rounding);
* PQ with sub-vectors shorter than 16: Σ (r − p)² by the difference (faiss's direct loop);
  longer: ||r||² + ||p||² − 2 r·p (faiss's BLAS distance tables).
Ties go to the lowest index, as in faiss. The codes are packed in faiss's layout
(`IVFPQCodec`), so `add_codes` fills the index with them as with faiss's own.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from knnlm_core.index import IVFPQCodec

ROWS = 16384  # keys per step: (16384 x nlist) and (M x 16384 x ksub) float32 distances
DIRECT_BELOW = 16  # faiss encodes sub-vectors shorter than this with a direct loop, longer ones with BLAS


@contextmanager
def ieee_float32():
    """float32 matmuls in full float32 (no TF32) while encoding; the global setting restored after."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


class TorchIVFPQEncoder:
    """`encode_with_error` for one trained IVFPQ codec on `device`: (codes (n, code_size) uint8,
    ||x − x̂||² (n,) float64), x̂ decoded from the codes as faiss's `sa_decode` does."""

    def __init__(self, codec: IVFPQCodec, device: str):
        self.codec, self.device = codec, device
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
        self.transforms = [(t(a), t(b)) for a, b in codec.transforms]
        self.centroids = t(codec.centroids)  # (nlist, d)
        self.centroid_sq = (self.centroids * self.centroids).sum(1)  # (nlist,)
        self.pq = t(codec.pq_centroids)  # (M, ksub, dsub)
        self.pq_sq = (self.pq * self.pq).sum(2)  # (M, ksub)

    def encode_with_error(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes and PQ errors of float32 rows (n, d), ROWS keys at a time."""
        codes, errors = [], []
        with ieee_float32():
            for a in range(0, len(block), ROWS):
                x = torch.from_numpy(np.ascontiguousarray(block[a : a + ROWS], dtype=np.float32)).to(self.device)
                lists, sub_codes, err = self.encode_rows(x)
                codes.append(pack_codes(lists.cpu().numpy(), sub_codes.cpu().numpy(), self.codec))
                errors.append(err.cpu().numpy())
        if not codes:
            return np.zeros((0, code_size(self.codec)), dtype=np.uint8), np.zeros(0)
        return np.concatenate(codes), np.concatenate(errors)

    def encode_rows(self, x):
        """(lists (n,) int64, sub-quantizer codes (n, M) int64, PQ error (n,) float64) of rows x (n, d_in)."""
        y = x
        for a, b in self.transforms:
            y = torch.addmm(b, y, a.T)  # x A^T + b, as faiss's LinearTransform
        lists = torch.argmin(self.centroid_sq[None, :] - 2 * (y @ self.centroids.T), dim=1)  # (n,)
        base = self.centroids[lists] if self.codec.by_residual else torch.zeros_like(y)
        residual = (y - base).view(len(y), *self.pq.shape[::2])  # (n, M, dsub)
        sub_codes = self.nearest_pq(residual)  # (n, M)
        decoded = self.pq[torch.arange(self.pq.shape[0], device=y.device)[None, :], sub_codes].reshape(y.shape)
        y_hat = decoded + base  # faiss sa_decode: the decoded residual plus the centroid, in float32
        for a, b in reversed(self.transforms):
            y_hat = (y_hat - b) @ a  # orthonormal A: the reverse transform faiss applies
        diff = (x - y_hat).double()
        return lists, sub_codes, (diff * diff).sum(1)

    def nearest_pq(self, residual):
        """Nearest PQ centroid (n, M) int64 of each sub-vector of residuals (n, M, dsub)."""
        dsub = residual.shape[2]
        if dsub < DIRECT_BELOW:
            dists = torch.zeros(residual.shape[0], *self.pq.shape[:2], device=residual.device)  # (n, M, ksub)
            for j in range(dsub):  # Σ_j (r_j − p_j)², one component at a time: no (n, M, ksub, dsub) buffer
                diff = residual[:, :, None, j] - self.pq[None, :, :, j]
                dists += diff * diff
            return torch.argmin(dists, dim=2)
        r = residual.transpose(0, 1)  # (M, n, dsub)
        dots = torch.bmm(r, self.pq.transpose(1, 2))  # (M, n, ksub)
        dists = (r * r).sum(2)[:, :, None] + self.pq_sq[:, None, :] - 2 * dots
        return torch.argmin(dists, dim=2).T


def code_size(codec: IVFPQCodec) -> int:
    """Bytes per code: the list number, then M codes of nbits packed."""
    m = codec.pq_centroids.shape[0]
    return codec.coarse_bytes + (m * codec.nbits + 7) // 8


def pack_codes(lists: np.ndarray, sub_codes: np.ndarray, codec: IVFPQCodec) -> np.ndarray:
    """faiss's sa_encode bytes (n, code_size) uint8: list number little-endian, then the sub-quantizer
    codes bit-packed from the lowest bit of the first byte up (faiss's PQEncoderGeneric; nbits = 8: one
    byte each)."""
    n, m = sub_codes.shape
    coarse = (lists[:, None] >> (8 * np.arange(codec.coarse_bytes))) & 0xFF  # (n, coarse_bytes)
    if codec.nbits == 8:
        pq = sub_codes.astype(np.uint8)
    else:
        bits = (sub_codes[:, :, None] >> np.arange(codec.nbits)) & 1  # (n, M, nbits), lowest bit first
        pq = np.packbits(bits.reshape(n, m * codec.nbits).astype(np.uint8), axis=1, bitorder="little")
    return np.concatenate([coarse.astype(np.uint8), pq], axis=1)
