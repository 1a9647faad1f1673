"""The neighbour block (SPEC §7): every neighbour of every query, written once by the search.

One block per query split and index (`neighbours/<split>-<index>/` in the run directory:
splits `eval`, `valid`; indexes `plain`, each whitening kind, and `exact` for the brute-force
top-k of SPEC §8). It holds (T, k) arrays in rank order, as shards of fixed row ranges:

    shard_00000.ids.npy         int64    entry id, -1 = no neighbour (too few candidates scanned)
    shard_00000.values.npy      int32    the entry's value (next token), -1 = no neighbour
    shard_00000.dist_pq.npy     float32  the index's (PQ) squared L2 distance, +inf = no neighbour
                                         (NaN throughout for the exact block: no index involved)
    shard_00000.dist_exact.npy  float32  squared L2 from the stored fp16 keys in float32, +inf = none
    shard_00000.json            {"lo", "hi"}: written last, so a shard with it is whole
    block.json                  {"n_rows", "k", "shards": [[lo, hi], ...]}: written when all are

Every file is written to a temporary name and renamed, so a killed search leaves whole shards
and at most one missing. Each array reads with `numpy.load(..., mmap_mode="r")`; `Block.rows`
reads a row range across shards without loading the rest (numpy only: the app imports this).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = "neighbours"  # folder of the blocks inside a run directory
LISTING = "block.json"
COLUMNS: dict[str, type] = {"ids": np.int64, "values": np.int32, "dist_pq": np.float32, "dist_exact": np.float32}


class BlockError(ValueError):
    """A neighbour block that is missing, incomplete or does not match its listing (one line)."""


def block_dir(run_dir: str | Path, split: str, index: str) -> Path:
    """`<run_dir>/neighbours/<split>-<index>`."""
    return Path(run_dir) / ROOT / f"{split}-{index}"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic(path, write)


def _save_json(path: Path, obj) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj)))


def shard_file(folder: Path, i: int, column: str) -> Path:
    return Path(folder) / f"shard_{i:05d}.{column}.npy"


def shard_marker(folder: Path, i: int) -> Path:
    return Path(folder) / f"shard_{i:05d}.json"


def write_shard(folder: str | Path, i: int, lo: int, ids: np.ndarray, values: np.ndarray, dist_pq: np.ndarray,
                dist_exact: np.ndarray) -> None:
    """Shard i (rows lo .. lo + len(ids)) of a block: its four arrays, then its marker."""
    folder = Path(folder)
    arrays = {"ids": ids, "values": values, "dist_pq": dist_pq, "dist_exact": dist_exact}
    shape = ids.shape
    for name, arr in arrays.items():
        if arr.shape != shape:
            raise BlockError(f"neighbour block shard {i}: {name} has shape {arr.shape}, ids {shape}")
        _save_npy(shard_file(folder, i, name), np.ascontiguousarray(arr, dtype=COLUMNS[name]))
    _save_json(shard_marker(folder, i), {"lo": int(lo), "hi": int(lo + shape[0])})


def shard_done(folder: str | Path, i: int, lo: int, hi: int, k: int) -> bool:
    """Whether shard i covering rows [lo, hi) with k columns is whole (marker and four readable arrays)."""
    folder = Path(folder)
    try:
        mark = json.loads(shard_marker(folder, i).read_text())
        if (mark["lo"], mark["hi"]) != (lo, hi):
            return False
        for name, dtype in COLUMNS.items():
            arr = np.load(shard_file(folder, i, name), mmap_mode="r")
            if arr.shape != (hi - lo, k) or arr.dtype != dtype:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def finish(folder: str | Path, ranges: list[tuple[int, int]], k: int) -> None:
    """Write the listing once every shard is whole (BlockError naming the first that is not)."""
    folder = Path(folder)
    for i, (lo, hi) in enumerate(ranges):
        if not shard_done(folder, i, lo, hi, k):
            raise BlockError(f"neighbour block {folder.name}: shard {i} (rows {lo}..{hi}) is missing or incomplete")
    _save_json(folder / LISTING, {"n_rows": int(ranges[-1][1]) if ranges else 0, "k": int(k),
                                  "shards": [[int(lo), int(hi)] for lo, hi in ranges]})


@dataclass(frozen=True)
class Block:
    """A finished neighbour block: (n_rows, k) columns read by row range, memory-mapped per shard."""

    folder: Path
    n_rows: int
    k: int
    shards: tuple[tuple[int, int], ...]

    def column(self, name: str) -> Column:
        if name not in COLUMNS:
            raise KeyError(f"no column {name!r} in a neighbour block (columns: {', '.join(COLUMNS)})")
        return Column(self, name)

    def rows(self, name: str, lo: int = 0, hi: int | None = None, cols: int | None = None) -> np.ndarray:
        """Column `name` for rows [lo, hi) and its first `cols` columns, as one array (a view when the
        range lies in one shard)."""
        hi = self.n_rows if hi is None else min(hi, self.n_rows)
        cols = self.k if cols is None else cols
        parts = []
        for i, (a, b) in enumerate(self.shards):
            if b <= lo or a >= hi:
                continue
            arr = np.load(shard_file(self.folder, i, name), mmap_mode="r")
            parts.append(arr[max(lo, a) - a : min(hi, b) - a, :cols])
        if not parts:
            return np.empty((0, cols), dtype=COLUMNS[name])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def row_ranges(self, rows: int) -> list[tuple[int, int]]:
        """[lo, hi) ranges of at most `rows` rows that never straddle a shard (each read is one mmap slice)."""
        out = []
        for a, b in self.shards:
            out += [(lo, min(lo + rows, b)) for lo in range(a, b, max(1, rows))]
        return out


class Column:
    """One column of a block as a (n_rows, k) array-like: `len`, `shape`, `[lo:hi]` row slices."""

    def __init__(self, block: Block, name: str):
        self.block, self.name = block, name
        self.shape = (block.n_rows, block.k)
        self.dtype = np.dtype(COLUMNS[name])
        self.ndim = 2

    def __len__(self) -> int:
        return self.block.n_rows

    def __getitem__(self, item) -> np.ndarray:
        rows, cols = (item, slice(None)) if not isinstance(item, tuple) else item
        if isinstance(rows, slice) and rows.step in (None, 1):
            lo, hi, _ = rows.indices(self.block.n_rows)
            return self.block.rows(self.name, lo, max(lo, hi))[:, cols]
        return np.asarray(self.block.rows(self.name))[rows, cols]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.block.rows(self.name)
        return out if dtype is None else out.astype(dtype)


def open_block(folder: str | Path) -> Block:
    """The finished block in `folder`; BlockError (one line, with the fix) when it is absent or damaged."""
    folder = Path(folder)
    try:
        listing = json.loads((folder / LISTING).read_text())
        n_rows, k = int(listing["n_rows"]), int(listing["k"])
        shards = tuple((int(a), int(b)) for a, b in listing["shards"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BlockError(f"neighbour block {folder} has no readable {LISTING} ({type(err).__name__}): rebuild the "
                         "run's search stage (rerun precompute on it)") from err
    expect = 0
    for i, (lo, hi) in enumerate(shards):
        if lo != expect or not shard_done(folder, i, lo, hi, k):
            raise BlockError(f"neighbour block {folder}: shard {i} (rows {lo}..{hi}) is missing, truncated or "
                             "mislabelled; delete the folder and rerun precompute to search again")
        expect = hi
    if expect != n_rows:
        raise BlockError(f"neighbour block {folder}: shards cover {expect} rows, listing says {n_rows}; delete the "
                         "folder and rerun precompute")
    return Block(folder, n_rows, k, shards)


def find_block(run_dir: str | Path, split: str, index: str) -> Block | None:
    """The block if the run has a finished one, else None (runs built before the block existed)."""
    folder = block_dir(run_dir, split, index)
    return open_block(folder) if (folder / LISTING).exists() else None
