"""Whitened indexes (stage `whiten`; SPEC §9): the fitted transform whitens the keys (Mᵀ(C + εI)M = I with C
recomputed here), and each whitened variant's p_kNN and (eval, <kind>) neighbour block against a fresh search
of `index_<kind>.faiss` with whitened queries."""

from __future__ import annotations

import faiss
import numpy as np

from knnlm_core import neighbours

from .blocks import check_block
from .common import Check, RunData, close
from .mitigations import mitigation_frames
from .search import search_reference

STAGE = "whiten"
KINDS = ("zipfian", "entries")


class Whitened:
    """Rows of the keys whitened by (x - mean) @ matrix in float64 as they are read (for search_reference)."""

    def __init__(self, keys, mean: np.ndarray, matrix: np.ndarray):
        self.keys, self.mean, self.matrix = keys, mean, matrix

    def __getitem__(self, rows):
        return (np.asarray(self.keys[rows], np.float64) - self.mean) @ self.matrix


def whitened_covariance(keys, values: np.ndarray, kind: str, mean: np.ndarray, matrix: np.ndarray,
                        block: int = 262144) -> np.ndarray:
    """Covariance (d, d) of the whitened keys: type-weighted over type centroids (zipfian, SPEC §9) or over
    all entries (entries); the identity when the transform is right. One float64 pass over the keys."""
    n, d = len(values), keys.shape[1]
    v = int(values.max()) + 1
    sums, counts = np.zeros((v, d)), np.bincount(values, minlength=v).astype(np.float64)
    gram, total = np.zeros((d, d)), np.zeros(d)
    for lo in range(0, n, block):
        z = (np.asarray(keys[lo : lo + block], np.float64) - mean) @ matrix
        if kind == "zipfian":
            np.add.at(sums, values[lo : lo + block], z)
        else:
            gram += z.T @ z
            total += z.sum(axis=0)
    if kind == "zipfian":
        seen = counts > 0
        mu, p = sums[seen] / counts[seen, None], counts[seen] / n
        centre = p @ mu
        return (mu - centre).T @ ((mu - centre) * p[:, None])
    centre = total / n
    return gram / n - np.outer(centre, centre)


def check_kind(ctx: RunData, kind: str, tau: float, p_knn: np.ndarray) -> list[Check]:
    """One whitening kind: the transform, its (eval, kind) block and its p_kNN (S,) at the sampled positions."""
    w = np.load(ctx.run_dir / f"whiten_{kind}.npz")
    mean, matrix = w["mean"].astype(np.float64), w["matrix"].astype(np.float64)
    # Mᵀ (C + εI) M = I with C recomputed here: directions of variance below ε are damped, not blown up
    cov = whitened_covariance(ctx.keys, ctx.values, kind, mean, matrix) + float(w["eps"]) * matrix.T @ matrix
    err = float(np.abs(cov - np.eye(len(cov))).max())
    checks = [(f"{kind} whitening: Mᵀ(C + εI)M = I", err < 1e-4, f"max |diff| {err:.3g}")]
    index = faiss.read_index(str(ctx.run_dir / f"index_{kind}.faiss"))
    row = ctx.run.copy()
    row["temperature"] = tau
    qw = ((ctx.q.astype(np.float64) - mean) @ matrix).astype(np.float32)
    keys_w = Whitened(ctx.keys, mean, matrix)
    ref_w = search_reference(index, keys_w, ctx.values, qw, ctx.ev["token_id"].to_numpy()[ctx.pos], row)
    if (block := neighbours.find_block(ctx.run_dir, "eval", kind)) is not None:
        checks += check_block(f"eval-{kind}", block, ctx.pos, ref_w["ids"], ref_w["dist"], qw, keys_w, ctx.values)
    checks.append(close(f"p_knn_{kind} (re-searched over index_{kind}.faiss)", p_knn, ref_w["p_knn"], 1e-6, 1e-4))
    return checks


def applies(ctx: RunData) -> bool:
    return "mitigations" in ctx.relations()


def check(ctx: RunData) -> list[Check]:
    variants, mt = mitigation_frames(ctx.con)
    checks = []
    for kind in KINDS:
        if f"p_knn_{kind}" in mt.columns:
            tau = float(variants.loc[variants["variant"] == kind, "tau"].iloc[0])
            checks += check_kind(ctx, kind, tau, mt[f"p_knn_{kind}"].to_numpy()[ctx.pos])
    return checks
