"""Neighbour blocks (SPEC §7, `neighbours/<split>-<index>/`, written by the search stage): a block's rows at
sampled positions against a fresh search of the same queries. Used for the plain and the whitened blocks."""

from __future__ import annotations

import numpy as np

from .common import Check, close, equal


def check_block(name: str, block, pos: np.ndarray, ids: np.ndarray, dist: np.ndarray, q: np.ndarray, keys,
                values: np.ndarray) -> list[Check]:
    """A neighbour block's rows at the sampled positions against a fresh search (ids, dist) of q: the same
    neighbours up to tie swaps, values = values[ids], exact distances recomputed from the keys."""
    got = np.stack([block.rows("ids", int(p), int(p) + 1)[0] for p in pos])  # (S, k)
    checks = [equal(f"block {name}: shape (T, k)", [block.n_rows, block.k], [block.n_rows, ids.shape[1]])]
    got_d = np.stack([block.rows("dist_pq", int(p), int(p) + 1)[0] for p in pos])
    # faiss's float32 PQ distances differ between batch sizes (measured on the demo: up to 5.2e-5 relative,
    # 2.8e-4 absolute over 300 x 1,024), so near-ties swap, also at rank k, in or out of the list: per row the
    # sorted distances must agree to that precision, and the id sets to within 0.1%
    fresh_d = np.where(ids >= 0, dist, np.inf)
    d_ok = np.isclose(np.sort(got_d, axis=1), np.sort(fresh_d, axis=1), rtol=1e-4, atol=1e-3)
    common = sum(len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(got, ids))
    missing = int((ids >= 0).sum()) - common
    checks.append((f"block {name}: ids = a fresh index.search", bool(d_ok.all() and missing <= 1e-3 * got.size),
                   f"{int((got != ids).sum())} rank swaps, {missing} neighbours not in the fresh search (near-ties "
                   f"at rank k), {int((~d_ok).sum())} distance mismatches over {got.size}"))
    vals = np.stack([block.rows("values", int(p), int(p) + 1)[0] for p in pos])
    checks.append(equal(f"block {name}: values = values[ids]", vals, np.where(got >= 0, values[np.maximum(got, 0)],
                                                                                 -1)))
    de = np.stack([block.rows("dist_exact", int(p), int(p) + 1)[0] for p in pos])
    want = np.stack([np.where(row >= 0, np.sum((np.asarray(keys[np.maximum(row, 0)], np.float32) - qq) ** 2, axis=1),
                              np.inf) for row, qq in zip(got, q)])
    checks.append(close(f"block {name}: dist_exact recomputed", de, want, 1e-3, 1e-4))
    return checks
