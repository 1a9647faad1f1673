"""Zipfian whitening and entry whitening of keys and queries (SPEC §9; Yokoi et al., NeurIPS 2024).

Zipfian (type level): with p(v) = freq(v) / N and type centroids μ_v,
    μ_Z = Σ_v p(v) μ_v,   C_Z = Σ_v p(v) (μ_v − μ_Z)(μ_v − μ_Z)ᵀ.
Entry (the contrast): μ and C are the mean and (population) covariance over all N entries.
With C + εI = V S² Vᵀ (eigh), a key or query x becomes (x − μ) V S⁻¹; keys and queries get
the same transform. Fits stream over blocks of rows of an (N, d) array-like (np.memmap,
`knnlm_core.keystore.ShardedKeys`) and accumulate in float64. Pure numpy (faiss only in
`Whitening.to_faiss`, imported lazily).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 65_536  # rows read per block while fitting / applying
KINDS = ("entries", "zipfian")


@dataclass(frozen=True)
class Whitening:
    """A fitted whitening x ↦ (x − mean) @ matrix (d → d)."""

    kind: str  # "zipfian" (type-weighted, SPEC §9) or "entries" (all entries)
    eps: float  # ε added to the covariance's diagonal before the eigendecomposition (absolute)
    mean: np.ndarray  # (d,) float64 μ_Z or the entry mean
    matrix: np.ndarray  # (d, d) float64 V S⁻¹ (columns: eigenvectors scaled by 1 / sqrt(eigenvalue + ε))
    n_entries: int = 0  # N entries the fit read
    n_types: int = 0  # types with freq >= 1 (zipfian); 0 for entries

    def __post_init__(self):
        d = self.mean.shape[0]
        assert self.kind in KINDS, self.kind
        assert self.mean.shape == (d,) and self.matrix.shape == (d, d), (self.mean.shape, self.matrix.shape)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def apply(self, x, block: int = BLOCK, dtype=np.float32) -> np.ndarray:
        """Whitened rows (n, d) in `dtype` of an (n, d) array-like, computed block by block in `dtype`."""
        assert x.ndim == 2 and x.shape[1] == self.dim, (x.shape, self.dim)
        mean, matrix = self.mean.astype(dtype), self.matrix.astype(dtype)
        out = np.empty((x.shape[0], self.dim), dtype=dtype)  # (n, d)
        for lo in range(0, x.shape[0], block):
            xb = np.asarray(x[lo : lo + block], dtype=dtype)  # (b, d)
            out[lo : lo + len(xb)] = (xb - mean) @ matrix
        return out

    def linear_map(self) -> tuple[np.ndarray, np.ndarray]:
        """(A (d, d), b (d,)) float32 with whitened x = A x + b (faiss LinearTransform's form)."""
        a = self.matrix.T
        return a.astype(np.float32), (-(a @ self.mean)).astype(np.float32)

    def to_faiss(self):
        """A trained faiss.LinearTransform computing the same map (to prepend via IndexPreTransform)."""
        import faiss

        a, b = self.linear_map()
        lt = faiss.LinearTransform(self.dim, self.dim, True)
        faiss.copy_array_to_vector(a.ravel(), lt.A)
        faiss.copy_array_to_vector(b, lt.b)
        lt.is_trained = True
        return lt

    def save(self, path: str | Path) -> None:
        """Write the fitted transform to an .npz file."""
        np.savez(
            path, kind=np.array(self.kind), eps=np.array(self.eps), mean=self.mean, matrix=self.matrix,
            n_entries=np.array(self.n_entries), n_types=np.array(self.n_types),
        )

    @classmethod
    def load(cls, path: str | Path) -> Whitening:
        """Read a transform written by `save`."""
        with np.load(path, allow_pickle=False) as z:
            return cls(
                kind=str(z["kind"]), eps=float(z["eps"]), mean=z["mean"].astype(np.float64),
                matrix=z["matrix"].astype(np.float64), n_entries=int(z["n_entries"]), n_types=int(z["n_types"]),
            )


def type_sums(keys, values: np.ndarray, vocab_size: int | None = None, block: int = BLOCK):
    """Streamed per-type (counts (V,) int64, key sums (V, d) float64) of keys (N, d) by values (N,)."""
    values = np.asarray(values)
    n, d = keys.shape
    assert values.shape == (n,), (values.shape, n)
    v = int(values.max(initial=-1)) + 1 if vocab_size is None else int(vocab_size)
    counts = np.bincount(values, minlength=v).astype(np.int64)  # (V,)
    sums = np.zeros((v, d), dtype=np.float64)  # (V, d)
    for lo in range(0, n, block):
        vals = values[lo : lo + block]
        order = np.argsort(vals, kind="stable")
        sv = vals[order]
        starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])  # first row of each type in the block
        xb = np.asarray(keys[lo : lo + block])[order].astype(np.float64)  # (b, d) sorted by type (gathered in fp16)
        sums[sv[starts]] += np.add.reduceat(xb, starts, axis=0)
    return counts, sums


def entry_moments(keys, block: int = BLOCK) -> tuple[int, np.ndarray, np.ndarray]:
    """Streamed (N, mean (d,), population covariance (d, d)) in float64.

    Blocks are centred on their own mean and merged with Chan et al.'s pairwise update, so
    no large E[x xᵀ] − μ μᵀ cancellation occurs.
    """
    n_total, d = keys.shape
    n, mean, m2 = 0, np.zeros(d), np.zeros((d, d))
    for lo in range(0, n_total, block):
        xb = np.asarray(keys[lo : lo + block], dtype=np.float64)  # (b, d)
        nb, mb = len(xb), xb.mean(axis=0)
        xc = xb - mb
        delta = mb - mean
        m2 += xc.T @ xc + np.outer(delta, delta) * (n * nb / (n + nb))
        mean = mean + delta * (nb / (n + nb))
        n += nb
    assert n > 0, "no keys"
    return n, mean, m2 / n


def zipfian_moments(counts: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ_Z (d,), C_Z (d, d)) from per-type counts (V,) and key sums (V, d)."""
    seen = counts > 0
    n = counts.sum()
    assert n > 0, "no entries"
    p = counts[seen] / n  # (V_seen,) p(v)
    mu_v = sums[seen] / counts[seen, None]  # (V_seen, d) type centroids
    mu_z = p @ mu_v  # (d,)
    dev = mu_v - mu_z  # (V_seen, d)
    return mu_z, (dev * p[:, None]).T @ dev


def whitening_matrix(cov: np.ndarray, eps: float) -> np.ndarray:
    """V S⁻¹ (d, d) with cov + εI = V S² Vᵀ; each eigenvector's sign fixed (largest |entry| > 0)."""
    evals, evecs = np.linalg.eigh(cov + eps * np.eye(len(cov)))
    if evals.min() <= 0:
        raise ValueError(f"covariance + εI is not positive definite (min eigenvalue {evals.min():.3g}); raise eps")
    pivot = evecs[np.argmax(np.abs(evecs), axis=0), np.arange(len(cov))]
    evecs = evecs * np.sign(pivot)  # deterministic signs: one transform per covariance
    return evecs / np.sqrt(evals)


def absolute_eps(cov: np.ndarray, eps_rel: float) -> float:
    """ε = eps_rel · trace(C) / d: a regulariser on the scale of the average variance."""
    return float(eps_rel * np.trace(cov) / len(cov))


def fit_zipfian(keys, values: np.ndarray, eps_rel: float = 1e-6, block: int = BLOCK) -> Whitening:
    """Zipfian whitening (SPEC §9) fitted on keys (N, d) with their values (N,), streamed."""
    counts, sums = type_sums(keys, values, block=block)
    mu_z, c_z = zipfian_moments(counts, sums)
    eps = absolute_eps(c_z, eps_rel)
    return Whitening("zipfian", eps, mu_z, whitening_matrix(c_z, eps), int(counts.sum()), int((counts > 0).sum()))


def fit_entries(keys, eps_rel: float = 1e-6, block: int = BLOCK) -> Whitening:
    """Entry whitening (SPEC §9's contrast): mean and covariance over all N entries, streamed."""
    n, mean, cov = entry_moments(keys, block)
    eps = absolute_eps(cov, eps_rel)
    return Whitening("entries", eps, mean, whitening_matrix(cov, eps), n, 0)


def partial_moments(kind: str, keys, values: np.ndarray, vocab_size: int, block: int = BLOCK) -> dict[str, np.ndarray]:
    """What one shard of keys (n, d) contributes to a fit: per-type counts and sums (zipfian), or its
    count, mean and centred second moment (entries); `merge_partials` reduces them."""
    if kind == "zipfian":
        counts, sums = type_sums(keys, values, vocab_size, block)
        return {"counts": counts, "sums": sums}
    n, mean, cov = entry_moments(keys, block)
    return {"n": np.array(n), "mean": mean, "m2": cov * n}


def merge_partials(kind: str, parts: list[dict[str, np.ndarray]], eps_rel: float = 1e-6) -> Whitening:
    """The whitening of all shards from their partial moments, in shard order (Chan et al.'s pairwise
    update for entries, so no E[x xᵀ] − μ μᵀ cancellation)."""
    if kind == "zipfian":
        counts = sum(p["counts"] for p in parts)
        mu_z, c_z = zipfian_moments(counts, sum(p["sums"] for p in parts))
        eps = absolute_eps(c_z, eps_rel)
        return Whitening("zipfian", eps, mu_z, whitening_matrix(c_z, eps), int(counts.sum()), int((counts > 0).sum()))
    n, mean, m2 = 0, np.zeros_like(parts[0]["mean"]), np.zeros_like(parts[0]["m2"])
    for p in parts:
        nb, mb = int(p["n"]), p["mean"]
        delta = mb - mean
        m2 = m2 + p["m2"] + np.outer(delta, delta) * (n * nb / (n + nb))
        mean = mean + delta * (nb / (n + nb))
        n += nb
    cov = m2 / n
    eps = absolute_eps(cov, eps_rel)
    return Whitening("entries", eps, mean, whitening_matrix(cov, eps), n, 0)


def fit(kind: str, keys, values: np.ndarray, eps_rel: float = 1e-6, block: int = BLOCK) -> Whitening:
    """Fit the whitening named by a run's `whiten` option ("entries" | "zipfian")."""
    if kind == "zipfian":
        return fit_zipfian(keys, values, eps_rel, block)
    if kind == "entries":
        return fit_entries(keys, eps_rel, block)
    raise ValueError(f"unknown whitening {kind!r}; expected one of {KINDS}")


class WhitenedKeys:
    """Whitened view of an (N, d) key array-like: rows are transformed (float32) as they are read."""

    def __init__(self, keys, transform: Whitening):
        self.keys, self.transform = keys, transform
        self.shape = keys.shape
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return self.transform.apply(np.asarray(self.keys[rows]).reshape(-1, self.shape[1]))
