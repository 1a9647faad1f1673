"""The file format of neulab/knn-transformers' datastores: names, sizes, memmaps and the index (SPEC §13 a).

Read from `knnlm.py` at commit 5b370d2 (`KNNSaver`):
- `{dir}/dstore_{model_type}_{size}_{dim}_keys.npy`: a raw `np.memmap` (no .npy header despite the
  extension), float16 (size, dim); `..._vals.npy`: raw int32 (size, 1). Size and dim live only in the name.
- `{dir}/index_{model_type}_{size}_{dim}.indexed`: `IndexIVFPQ(IndexFlatL2(d), d, 4096, 64, 8)` trained
  on <= 1M keys, `add_with_ids(arange)`, read with `IO_FLAG_ONDISK_SAME_DIR`, nprobe 32.
- Sharded indexes: several files `index_{model_type}_{size}_{dim}.indexed.<k>` (k = 0, 1, ...), each with
  shard-local ids 0..n_k-1, read as one index with global ids = shard offset + local id. One file whose
  ids repeat (CUPalex/knnlm's `update_index` adds each chunk with `arange(chunk)`) is refused: which
  chunk an entry came from is not recoverable from the file.

Checks here, each a one-line `DatastoreError` naming the fix: file sizes vs names; the index's d,
metric, ntotal and ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PEER = "neulab/knn-transformers"
PEER_COMMIT = "5b370d2"  # knnlm.py / run_clm.py read at this commit
KEYS_RE = re.compile(r"^dstore_(?P<mt>.+)_(?P<size>\d+)_(?P<dim>\d+)_keys\.npy$")
VALS_RE = re.compile(r"^dstore_(?P<mt>.+)_(?P<size>\d+)_(?P<dim>\d+)_vals\.npy$")
SHARD_RE = re.compile(r"\.indexed\.(\d+)$")
CHUNK = 1 << 20  # rows per vectorised block


class DatastoreError(ValueError):
    """The datastore cannot be used with this model and text; the one-line message names the fix."""


# ---------------------------------------------------------------- names and files

@dataclass(frozen=True)
class PeerDatastore:
    """A knn-transformers datastore in `directory`: shape from the file names, paths of what is there."""

    directory: Path
    model_type: str
    size: int  # N entries
    dim: int  # d
    values_path: Path
    keys_path: Path | None  # None: a values-only release (e.g. the GPT-2 WikiText-103 one)
    index_paths: tuple[Path, ...]  # one file, or shards with shard-local ids in order; () = no index

    def prefix(self) -> str:
        return f"dstore_{self.model_type}_{self.size}_{self.dim}"


def dstore_prefix(model_type: str, size: int, dim: int) -> str:
    """knnlm.py's `get_dstore_path` file prefix."""
    return f"dstore_{model_type}_{size}_{dim}"


def index_name(model_type: str, size: int, dim: int) -> str:
    """knnlm.py's `get_index_path` file name."""
    return f"index_{model_type}_{size}_{dim}.indexed"


def find_datastore(directory: Path, size: int | None = None) -> PeerDatastore:
    """The datastore in `directory` (the one of `size` when several); DatastoreError if none or ambiguous."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatastoreError(f"{directory} is no directory: point --dir at the folder holding dstore_*_vals.npy")
    found = [(m["mt"], int(m["size"]), int(m["dim"])) for p in sorted(directory.iterdir())
             if (m := VALS_RE.match(p.name))]
    if size is not None:
        found = [f for f in found if f[1] == size]
    if not found:
        raise DatastoreError(f"no dstore_<model_type>_<size>_<dim>_vals.npy in {directory}"
                             + (f" with size {size}" if size is not None else "")
                             + ": point --dir at the knn-transformers dstore_dir")
    if len(found) > 1:
        raise DatastoreError(f"{directory} holds {len(found)} datastores ({', '.join(map(str, found))}): "
                             "choose one with --size")
    mt, n, d = found[0]
    keys = directory / f"{dstore_prefix(mt, n, d)}_keys.npy"
    return PeerDatastore(directory, mt, n, d, directory / f"{dstore_prefix(mt, n, d)}_vals.npy",
                         keys if keys.exists() else None, index_files(directory, mt, n, d))


def index_files(directory: Path, model_type: str, size: int, dim: int) -> tuple[Path, ...]:
    """The index file, else its shards `<name>.<k>` ordered by k (0, 1, ... without gaps)."""
    main = directory / index_name(model_type, size, dim)
    if main.exists():
        return (main,)
    shards = sorted((int(m.group(1)), p) for p in directory.glob(index_name(model_type, size, dim) + ".*")
                     if (m := SHARD_RE.search(p.name)))
    if [k for k, _ in shards] != list(range(len(shards))):
        raise DatastoreError(f"index shards in {directory} are numbered {[k for k, _ in shards]}, not 0..n-1: "
                             "restore the missing shard files")
    return tuple(p for _, p in shards)


def check_file_size(path: Path, rows: int, row_bytes: int, what: str) -> None:
    """DatastoreError naming the file when its byte size is not rows * row_bytes (truncated, wrong name)."""
    have, want = path.stat().st_size, rows * row_bytes
    if have == want:
        return
    hint = ""
    if have % row_bytes == 0:
        hint = f"; it holds exactly {have // row_bytes:,} rows: rename it to that size if the name is wrong"
    if what == "values" and have * 2 == want:
        hint = "; it is half the int32 size: the values look stored as int16 (knnlm #6), rebuild them as int32"
    raise DatastoreError(f"{path.name} has {have:,} bytes, its name says {rows:,} x {row_bytes} = {want:,} "
                         f"({what}){hint}; otherwise the file is truncated: copy it again or rebuild it")


def check_file_sizes(ds: PeerDatastore) -> None:
    """SPEC §13 (a): the keys (fp16, N x d) and values (int32, N x 1) files hold what their names say."""
    check_file_size(ds.values_path, ds.size, 4, "values")
    if ds.keys_path is not None:
        check_file_size(ds.keys_path, ds.size, 2 * ds.dim, "keys")


def open_values(ds: PeerDatastore) -> np.ndarray:
    """Values as a read-only (N,) int32 view of the memmap, where it lies (knnlm.py's (N, 1) layout)."""
    return np.memmap(ds.values_path, dtype=np.int32, mode="r", shape=(ds.size, 1))[:, 0]


def open_keys(ds: PeerDatastore) -> np.ndarray | None:
    """Keys as a read-only (N, d) float16 memmap where they lie, or None without a keys file."""
    if ds.keys_path is None:
        return None
    return np.memmap(ds.keys_path, dtype=np.float16, mode="r", shape=(ds.size, ds.dim))


# ---------------------------------------------------------------- index

def read_index_file(path: Path):
    """A faiss index read memory-mapped, read-only (IVF lists stay on disk)."""
    import faiss

    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise DatastoreError(f"{path.name} is no readable faiss index ({first[:120]}): copy it again or rebuild "
                             "it (export writes one)") from None


def index_ids(index) -> np.ndarray:
    """The ids stored in `index` (ntotal,) int64: IVF lists in list order, an IDMap's map, else arange."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is None:
        if hasattr(index, "id_map"):
            return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)
        return np.arange(index.ntotal, dtype=np.int64)
    invlists, out = ivf.invlists, []
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n:
            ptr = invlists.get_ids(lst)
            out.append(faiss.rev_swig_ptr(ptr, n).copy())
            invlists.release_ids(lst, ptr)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def check_ids(ids: np.ndarray, n: int, path: Path) -> None:
    """Ids must be each of 0..n-1 exactly once; DatastoreError naming shard-local ids in one file."""
    if len(ids) and (ids.min() < 0 or ids.max() >= n):
        raise DatastoreError(f"{path.name}: ids span [{ids.min()}, {ids.max()}], expected 0..{n - 1}: the index "
                             "belongs to another datastore; rebuild it (export writes one)")
    counts = np.bincount(ids, minlength=n)
    if (counts != 1).any():
        raise DatastoreError(f"{path.name}: {int((counts == 0).sum()):,} ids missing and {int((counts > 1).sum()):,} "
                             "repeated: shard-local ids inside one index file (chunks added with arange(chunk)); "
                             "write one file per shard (<name>.0, .1, ...) or rebuild the index with ids = arange(N)")


def open_index(ds: PeerDatastore, nprobe: int = 32):
    """The datastore's index (shards joined with global ids) after SPEC §13's index checks; None without one."""
    import faiss

    from knnlm_core.index import set_nprobe

    if not ds.index_paths:
        return None
    parts = []
    for path in ds.index_paths:
        part = read_index_file(path)
        if part.d != ds.dim:
            raise DatastoreError(f"{path.name}: index dimension {part.d}, the datastore's is {ds.dim}: the index "
                                 "belongs to another model; rebuild it over these keys")
        if part.metric_type != faiss.METRIC_L2:
            raise DatastoreError(f"{path.name}: the index is not L2 (metric {part.metric_type}); knn-transformers' "
                                 "index is L2: rebuild it")
        set_nprobe(part, nprobe)
        parts.append(part)
    total = sum(p.ntotal for p in parts)
    if total != ds.size:
        raise DatastoreError(f"{ds.index_paths[0].name}: the index holds {total:,} entries, the datastore {ds.size:,}"
                             ": it belongs to another datastore (or adding stopped early); rebuild it")
    for path, part in zip(ds.index_paths, parts, strict=True):
        check_ids(index_ids(part), part.ntotal, path)
    if len(parts) == 1:
        return parts[0]
    joined = faiss.IndexShards(ds.dim, False, True)  # not threaded, successive_ids: shard k's ids += offset_k
    for part in parts:
        joined.add_shard(part)  # faiss's wrapper keeps a reference to each part
    return joined
