"""Exact k-nearest-neighbour search over the stored keys, streamed over key blocks.

On a GPU: chunked matmul (||q||² - 2 q·k + ||k||² in float32) with a running top-k merge;
on the CPU: faiss's exact search per block merged in a `ResultHeap`. Both return the ids
(Q, k) of the k nearest keys (squared L2) of each query; `exact_knn_with_dists` also returns
their distances. Used by contamination (SPEC §5) and the exact-search stage (SPEC §8).
"""

from __future__ import annotations

import numpy as np

from knnlm_core.metrics import exact_knn as exact_knn_faiss
from knnlm_core.metrics import exact_knn_with_dists as exact_knn_faiss_with_dists

GPU_KEY_BLOCK = 1 << 18  # keys per block moved to the GPU: (4096 x 262144) float32 distances = 4.3 GB


def exact_knn(queries: np.ndarray, keys, k: int, device: str = "cpu") -> np.ndarray:
    """Ids (Q, k) of the exact k nearest keys of each float32 query, on `device` ("cpu" or "cuda")."""
    if device == "cuda":
        return exact_knn_torch(queries, keys, k, "cuda")
    return exact_knn_faiss(queries, keys, k)


def exact_knn_with_dists(queries: np.ndarray, keys, k: int, device: str = "cpu",
                         progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances (Q, k) float32 ascending, ids (Q, k)) of the exact k nearest keys."""
    if device == "cuda":
        return exact_knn_torch(queries, keys, k, "cuda", with_dists=True)
    return exact_knn_faiss_with_dists(queries, keys, k, progress)


def exact_knn_torch(queries: np.ndarray, keys, k: int, device: str, block: int = GPU_KEY_BLOCK,
                    query_block: int = 4096, with_dists: bool = False):
    """Exact top-k ids (and distances when `with_dists`) with torch on `device` (the GPU path;
    also runs on the CPU for tests)."""
    import torch

    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(device)  # (Q, d)
    best_d = torch.full((len(q_all), k), float("inf"), device=device)
    best_i = torch.full((len(q_all), k), -1, dtype=torch.int64, device=device)
    for start in range(0, len(keys), block):
        kb = torch.from_numpy(np.ascontiguousarray(keys[start : start + block])).to(device).float()  # (b, d)
        k_sq = (kb * kb).sum(1)
        for a in range(0, len(q_all), query_block):
            q = q_all[a : a + query_block]
            d2 = (q * q).sum(1, keepdim=True) - 2 * q @ kb.T + k_sq[None, :]  # (q, b)
            kk = min(k, d2.shape[1])
            top_d, top_i = torch.topk(d2, kk, dim=1, largest=False)
            cat_d = torch.cat([best_d[a : a + len(q)], top_d], 1)
            cat_i = torch.cat([best_i[a : a + len(q)], top_i + start], 1)
            sel_d, sel = torch.topk(cat_d, k, dim=1, largest=False)
            best_d[a : a + len(q)], best_i[a : a + len(q)] = sel_d, torch.gather(cat_i, 1, sel)
    if with_dists:
        return best_d.clamp(min=0).cpu().numpy(), best_i.cpu().numpy()
    return best_i.cpu().numpy()
