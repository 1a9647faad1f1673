"""One reader for the datastore keys in either layout of SPEC §7.

A run stores its keys as `keys.npy` (float16, N x d) or as shards: a folder `keys/` of
float16 `.npy` files whose concatenation, in the order `keys/shards.json` lists them, is
the N x d key array. `open_keys(run_dir)` returns an (N, d) array-like either way, so
every consumer (index, metrics, verify, docs) reads keys the same way. No torch import.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHARD_DIR = "keys"
SHARD_LIST = "shards.json"


class KeyStoreError(ValueError):
    """The key files of a run are missing, truncated or inconsistent; the message names the fix."""


class ShardedKeys:
    """(N, d) read-only view over float16 key shards; supports len, shape, slicing and row indexing."""

    def __init__(self, shards: list[np.ndarray]):
        assert shards and all(s.ndim == 2 and s.shape[1] == shards[0].shape[1] for s in shards)
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # (S + 1,) first row of each shard
        self.dtype = shards[0].dtype
        self.shape = (int(self.offsets[-1]), int(shards[0].shape[1]))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as one array (a view when they lie in one shard)."""
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        parts = []
        s = first
        while s < len(self.shards) and self.offsets[s] < hi:
            a, b = max(lo, self.offsets[s]) - self.offsets[s], min(hi, self.offsets[s + 1]) - self.offsets[s]
            parts.append(self.shards[s][a:b])
            s += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), self.dtype)

    def __getitem__(self, item):
        if isinstance(item, tuple):  # keys[rows, cols]
            return self[item[0]][(slice(None),) + item[1:]] if not isinstance(item[0], int) else self[item[0]][item[1:]]
        if isinstance(item, slice):
            lo, hi, step = item.indices(len(self))
            rows = self._rows(lo, max(lo, hi))
            return rows if step == 1 else rows[::step]
        if isinstance(item, (int, np.integer)):
            i = int(item) + (len(self) if item < 0 else 0)
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.shards[s][i - self.offsets[s]]
        rows = np.asarray(item)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64)
        rows = np.where(rows < 0, rows + len(self), rows)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1  # (n,)
        out = np.empty(rows.shape + (self.shape[1],), dtype=self.dtype)
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self.shards[s][rows[sel] - self.offsets[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        full = self._rows(0, len(self))
        return full.astype(dtype) if dtype is not None else np.asarray(full)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def read_shard_list(run_dir: Path) -> list[dict]:
    """Entries {file, rows} of keys/shards.json; KeyStoreError if unreadable."""
    path = Path(run_dir) / SHARD_DIR / SHARD_LIST
    try:
        listing = json.loads(path.read_text())
        return [{"file": str(e["file"]), "rows": int(e["rows"]), "raw": bool(e.get("raw", False))}
                for e in listing["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KeyStoreError(f"{path} is missing or corrupt ({err}): delete {path.parent} and rerun to rebuild the "
                            "datastore") from err


def open_keys(run_dir: Path, n: int | None = None, d: int | None = None):
    """The run's keys as an (N, d) float16 array-like (memmapped): keys.npy, or keys/ shards."""
    run_dir = Path(run_dir)
    single = run_dir / "keys.npy"
    if (run_dir / SHARD_DIR / SHARD_LIST).exists():
        shards = []
        for entry in read_shard_list(run_dir):
            path = run_dir / SHARD_DIR / entry["file"]  # an absolute "file" stays absolute
            if entry["raw"]:
                shards.append(_load_raw(path, entry["rows"], d))
                continue
            shards.append(_load(path, (entry["rows"], d) if d else None, rows=entry["rows"]))
        if not shards:
            raise KeyStoreError(f"{run_dir / SHARD_DIR / SHARD_LIST} lists no shards: delete it and rerun")
        keys = ShardedKeys(shards)
    elif single.exists():
        keys = _load(single, None)
    else:
        raise KeyStoreError(f"no keys in {run_dir} (neither keys.npy nor keys/shards.json): rerun the precompute")
    if (n is not None and len(keys) != n) or (d is not None and keys.shape[1] != d):
        raise KeyStoreError(f"keys in {run_dir} have shape {keys.shape}, expected ({n}, {d}): delete them and rerun "
                            "to rebuild the datastore")
    return keys


def _load(path: Path, shape: tuple | None, rows: int | None = None) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise KeyStoreError(f"key file {path} is truncated or corrupt ({err}): delete it and rerun to rebuild "
                            "the datastore") from err
    if arr.dtype != np.float16 or arr.ndim != 2 or (rows is not None and len(arr) != rows) or \
            (shape is not None and arr.shape != shape):
        raise KeyStoreError(f"key file {path} has shape {arr.shape} / {arr.dtype}, expected float16 rows "
                            f"{rows if rows is not None else 'N'} x d: delete it and rerun to rebuild the datastore")
    return arr


def _load_raw(path: Path, rows: int, d: int | None) -> np.ndarray:
    """A headerless float16 (rows, d) file (an imported knn-transformers keys file), memory-mapped where it lies."""
    width = d if d else (path.stat().st_size // (2 * rows) if path.is_file() and rows else 0)
    try:
        if not width or path.stat().st_size != 2 * rows * width:
            raise ValueError(f"{path.stat().st_size:,} bytes, expected 2 x {rows:,} x {width}")
        return np.memmap(path, dtype=np.float16, mode="r", shape=(rows, width))
    except (OSError, ValueError) as err:
        raise KeyStoreError(f"imported key file {path} is missing or of another size ({err}): restore it, or "
                            "rerun the import") from err
