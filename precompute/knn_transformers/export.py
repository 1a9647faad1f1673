"""Export a run's datastore and index in knn-transformers' format (SPEC §13), readable by its `knnlm.py`.

Keys and values become the raw memmaps `KNNSaver` writes; the run's index is copied when knnlm.py can
load it (an L2 IndexIVFPQ), otherwise one is trained with the peer's recipe (`peer_ivfpq`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .format import CHUNK, DatastoreError, check_ids, dstore_prefix, index_ids, index_name


def peer_ivfpq(keys, n: int, d: int, nlist: int = 4096, m: int = 64, seed: int = 1):
    """knnlm.py's `build_index` recipe: IndexIVFPQ(IndexFlatL2(d), d, nlist, m, 8) on <= 1M keys, ids arange.

    nlist is capped at N // 39 and m lowered to a divisor of d so that small datastores train."""
    import faiss

    nlist = max(1, min(nlist, n // 39))
    m = max(x for x in range(1, min(m, d) + 1) if d % x == 0)
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, m, 8)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(1_000_000, n), replace=False))
    index.train(np.ascontiguousarray(keys[rows], dtype=np.float32))
    for start in range(0, n, CHUNK):
        block = np.ascontiguousarray(keys[start:start + CHUNK], dtype=np.float32)
        index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    return index


def native_is_peer_readable(index) -> bool:
    """True for an L2 IndexIVFPQ at the top level (knnlm.py sets `.nprobe` and calls `make_direct_map` on it)."""
    import faiss

    return isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ) and index.metric_type == faiss.METRIC_L2


def export_run(run_dir: Path, out: Path, nlist: int = 4096, m: int = 64) -> dict:
    """Write run_dir's datastore and index in knn-transformers' format into the new folder `out` (atomic).

    The run's index is copied when it is an L2 IndexIVFPQ; otherwise one is trained with the peer's
    recipe (`peer_ivfpq`, nlist and m as given)."""
    from knnlm_core.keystore import open_keys as open_run_keys

    run_dir, out = Path(run_dir), Path(out)
    manifest_path = run_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        model_type, n, d = str(manifest["model_type"]), int(manifest["n_entries"]), int(manifest["key_dim"])
    except (OSError, ValueError, KeyError) as err:
        raise DatastoreError(f"{manifest_path} is missing or unreadable ({type(err).__name__}): point --run-dir at a "
                             "finished run") from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatastoreError(f"{out} exists and is not an empty folder: choose a new --out")
    keys = open_run_keys(run_dir, n, d)  # (N, d) float16
    values = np.load(run_dir / "values.npy", mmap_mode="r") if (run_dir / "values.npy").exists() else None
    if values is None or values.shape != (n,):
        raise DatastoreError(f"{run_dir / 'values.npy'} is missing or not ({n},): rerun the datastore stage")
    native = run_dir / "index.faiss"
    if not native.exists():
        raise DatastoreError(f"{native} is missing: rerun the index stage before exporting")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = write_peer_files(tmp, model_type, n, d, keys, values, native, nlist, m)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "model_type": model_type, "size": n, "dim": d, **info}


def write_peer_files(folder: Path, model_type: str, n: int, d: int, keys, values: np.ndarray, native: Path,
                     nlist: int = 4096, m: int = 64) -> dict:
    """Raw memmaps of keys (fp16 (N, d)) and values (int32 (N, 1)) as KNNSaver writes them, and the index."""
    import faiss

    prefix = folder / dstore_prefix(model_type, n, d)
    out_keys = np.memmap(f"{prefix}_keys.npy", dtype=np.float16, mode="w+", shape=(n, d))
    out_vals = np.memmap(f"{prefix}_vals.npy", dtype=np.int32, mode="w+", shape=(n, 1))
    for start in tqdm(range(0, n, CHUNK), desc="export keys", unit="block", disable=None):
        out_keys[start:start + CHUNK] = keys[start:start + CHUNK]
        out_vals[start:start + CHUNK, 0] = values[start:start + CHUNK]
    out_keys.flush(), out_vals.flush()
    del out_keys, out_vals
    index = faiss.read_index(str(native))
    target = folder / index_name(model_type, n, d)
    if native_is_peer_readable(index):
        check_ids(index_ids(index), n, native)
        shutil.copyfile(native, target)
        how = f"the run's own {type(faiss.downcast_index(index)).__name__} (copied)"
    else:
        rebuilt = peer_ivfpq(keys, n, d, nlist, m)
        faiss.write_index(rebuilt, str(target))
        how = (f"IndexIVFPQ(IndexFlatL2({d}), {d}, {rebuilt.nlist}, {rebuilt.pq.M}, 8) trained anew: the run's "
               f"{type(faiss.downcast_index(index)).__name__} is not an IndexIVFPQ knnlm.py can load")
    return {"index": how}
