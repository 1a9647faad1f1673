"""What every verify module shares: the check record, numeric comparisons and the run's loaded data.

A check is `(name, passed, detail)`. `RunData` holds what the checks read (the run's tables and
files, the sampled positions and their fresh search), loaded once by `load`. Nothing here is
imported from the code being checked: the pipeline's metric functions are recomputed, not reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

Check = tuple[str, bool, str]


def close(name: str, got, want, atol: float, rtol: float = 1e-5) -> Check:
    """Whether got and want agree within atol + rtol |want| (NaN where both are NaN)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    both_nan = np.isnan(got) & np.isnan(want)
    ok = got.shape == want.shape and bool(np.all(both_nan | np.isclose(got, want, atol=atol, rtol=rtol)))
    err = np.nanmax(np.abs(got - want)) if got.size and got.shape == want.shape else 0.0
    return name, ok, f"max |diff| {err:.3g} over {got.size}"


def equal(name: str, got, want) -> Check:
    """Whether got and want have the same shape and equal elements."""
    got, want = np.asarray(got), np.asarray(want)
    ok = got.shape == want.shape and bool(np.all(got == want))
    return name, ok, f"{int(np.sum(got != want)) if got.shape == want.shape else 'shape'} mismatches over {want.size}"


def digit_bin(freq: np.ndarray) -> np.ndarray:
    """floor(log10(freq)) by digit count, -1 for freq 0 (SPEC §3)."""
    return np.array([len(str(int(f))) - 1 if f > 0 else -1 for f in freq], dtype=np.int64)


def stored_rank(col: pd.Series) -> np.ndarray:
    """target_rank as int64 with NULL -> -1 (so a stored 0 stays visible as wrong)."""
    return col.astype("Float64").fillna(-1).to_numpy(dtype=np.float64).astype(np.int64)


def hit_matches(col: pd.Series, want: np.ndarray) -> np.ndarray:
    """Per row: a stored hit_k is non-NULL and equals `want` (bool (n,))."""
    got = col.astype("boolean")
    return ~got.isna().to_numpy() & (got.fillna(False).to_numpy(dtype=bool) == want)


@dataclass
class RunData:
    """A run's tables and files as the checks read them, and the sample they share.

    `pos` (S,) sorted evaluation positions re-searched, `q` (S, d) their float32 queries, `ref` the
    fresh search of q (see `search.search_reference`); `rng` is the generator that drew `pos` (the
    type check draws from it next, so its picks depend on the seed alone).
    """

    run_dir: Path
    con: Any  # read-only duckdb connection (store.open_readonly)
    run: pd.Series  # the `run` row
    ev: pd.DataFrame  # eval_tokens ORDER BY pos
    tt: pd.DataFrame  # token_types ORDER BY token_id
    dt: np.ndarray  # datastore_tokens.token_id ORDER BY pos
    manifest: dict
    values: np.ndarray  # (N,) int32
    keys: Any  # (N, d) float16, either key layout (knnlm_core.keystore.open_keys)
    queries: np.ndarray  # (T, d) float16, memory-mapped
    ev_ids: np.ndarray  # (T + 1,) evaluation token stream
    ds_ids: np.ndarray  # (N + 1,) datastore token stream
    index: Any  # faiss index of index.faiss
    freq: np.ndarray  # (V,) datastore frequency of every token id
    rng: np.random.Generator
    pos: np.ndarray  # (S,)
    q: np.ndarray  # (S, d) float32
    ref: dict
    exact_sample: int  # positions (the first of `pos`) the brute-force and scan checks use
    type_sample: int  # token types whose key-space metrics are recomputed

    @property
    def k(self) -> int:
        return int(self.run["k"])

    @property
    def lam(self) -> float:
        return float(self.run["lambda"])

    @property
    def store_neighbors(self) -> int:
        return int(self.run["store_neighbors"]) if "store_neighbors" in self.run.index else \
            int(self.manifest["store_neighbors"])

    def few(self) -> np.ndarray:
        """Indices into `pos` of the smaller sample the expensive scans use (its first exact_sample)."""
        return np.arange(min(self.exact_sample, len(self.pos)))

    def relations(self) -> set[str]:
        """Names of the tables and views in the run's database."""
        return {r[0] for r in self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
