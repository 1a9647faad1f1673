"""An imported knn-transformers datastore in place of the datastore stage, its index in place of the index stage.

`import_datastore = "knn-transformers:DIR"` (docs/IMPORT.md): `check_peer` runs every check of
`precompute.knn_transformers` during validation, before anything is written; the datastore stage then
calls `import_body` instead of extracting keys: `keys/shards.json` lists one raw (headerless) entry, a
symlink to the peer's keys file where it lies (no copy), `values.npy` holds the values, and
`import_alignment.npz` / `import_check.json` the alignment and the check report (the manifest's
`imported`). When DIR holds an index, the index stage links it as `index.faiss` (a fork's shards with
shard-local ids are merged into one index with global ids and written) instead of training one, and the
PQ error comes from that index. Supported now: a datastore with keys whose values follow the stream
contiguously (`values[i] == stream[i + 1]`) over the whole datastore text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from knnlm_core.config import import_dir
from knnlm_core.keystore import SHARD_DIR, SHARD_LIST
from precompute.runner import Run, RunError, save_json, save_npy, save_npz, write_index

CHECK_FILE = "import_check.json"  # the check report (the manifest's "imported")
ALIGNMENT_FILE = "import_alignment.npz"  # row -> stream position segments (row, target, length)
LINKED_KEYS = "imported_keys.raw"  # in keys/: a symlink to the peer's keys file (headerless float16)
CHUNK = 1 << 18  # keys per PQ-error block


def peer(run: Run):
    """The PeerDatastore named by the run's import_datastore (DatastoreError if DIR holds none)."""
    from precompute import knn_transformers as kt

    return kt.find_datastore(import_dir(run.cfg.import_datastore))


def import_key(run: Run) -> dict[str, Any]:
    """What the imported outputs depend on: the folder and each file's name, size and mtime."""
    ds = peer(run)
    files = [p for p in (ds.values_path, ds.keys_path, *ds.index_paths) if p is not None]
    return {"format": "knn-transformers", "dir": str(ds.directory.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def check_peer(run: Run, stream: np.ndarray) -> dict:
    """Every SPEC §13 check of the datastore against run.lm and the datastore stream, nothing written;
    returns the report dict (RunError, one line, when a check fails or the layout is not supported yet)."""
    from precompute import knn_transformers as kt

    try:
        ds = peer(run)
        report, _index = kt.check_datastore(ds, run.lm, len(run.tokenizer), stream, run.cfg.datastore_corpus,
                                            max_context=run.info["max_context"], stride=run.info["stride"],
                                            seed=run.cfg.seed, nprobe=run.cfg.nprobe)
    except kt.DatastoreError as err:
        raise RunError(f"import_datastore: {err}") from None
    al = report.alignment
    if ds.keys_path is None:
        raise RunError("import_datastore: the imported datastore has no keys; a run on a values-and-index release "
                       "is not wired into the pipeline yet: copy the keys file into the folder")
    if len(al.row) != 1 or int(al.target[0]) != 1 or ds.size != len(stream) - 1:
        raise RunError(f"import_datastore: the values follow {run.cfg.datastore_corpus} by the rule '{al.rule}' over "
                       f"{ds.size:,} rows, the stream has {len(stream):,} tokens; the pipeline takes a datastore of "
                       f"every token (values[i] == stream[i + 1]) yet: set datastore_limit_tokens = {ds.size + 1} "
                       "when it covers the start of the text")
    if len(ds.index_paths) > 1:
        check_mergeable(ds.index_paths)
    run.memo[("import_alignment",)] = al.to_arrays()
    return {**report.to_dict(), "index_used": bool(ds.index_paths)}


def link(target: Path, link_path: Path) -> None:
    """Point `link_path` at `target` (replacing what was there), atomically."""
    tmp = link_path.with_name(f".{link_path.name}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.resolve())
    os.replace(tmp, link_path)


def import_body(run: Run, _key: str) -> dict:
    """The datastore stage for an imported datastore: link the keys, write values, alignment and report."""
    from precompute import knn_transformers as kt

    report = run.info.get("imported")
    if not report:
        raise RunError("import_datastore: the datastore was not checked (internal): rerun")
    ds = peer(run)
    folder = run.path(SHARD_DIR)
    folder.mkdir(exist_ok=True)
    link(ds.keys_path, folder / LINKED_KEYS)
    save_json(folder / SHARD_LIST, {"n": ds.size, "d": ds.dim, "imported": str(ds.keys_path),
                                     "shards": [{"file": LINKED_KEYS, "rows": ds.size, "raw": True}]})
    save_npy(run.path("values.npy"), np.ascontiguousarray(kt.open_values(ds), dtype=np.int32))  # (N,)
    save_npz(run.path(ALIGNMENT_FILE), **run.memo.pop(("import_alignment",)))
    save_json(run.path(CHECK_FILE), report)
    return {"n_entries": ds.size, "key_shards": 1, "hook_point": f"imported ({kt.PEER} keys: last block's MLP input)"}


def check_mergeable(paths: tuple[Path, ...]) -> None:
    """RunError unless every index shard shares the first one's quantizer and codec (they merge into one)."""
    import faiss

    from precompute import knn_transformers as kt

    owner = kt.read_index_file(paths[0])  # kept alive: extract_index_ivf returns a view into it
    first = faiss.extract_index_ivf(owner)
    for path in paths[1:]:
        part = kt.read_index_file(path)
        try:
            first.check_compatible_for_merge(faiss.extract_index_ivf(part))
        except RuntimeError:
            raise RunError(f"import_datastore: index shard {path.name} has another quantizer or codec than "
                           f"{paths[0].name}, so they cannot be merged into one index: move the shards away to have "
                           "one trained over the keys") from None


def merge_shards(paths: tuple[Path, ...]):
    """One IVF index of the shards (loaded, not mapped), shard k's local ids shifted by the rows before it."""
    import faiss

    merged = faiss.read_index(str(paths[0]))
    offset = merged.ntotal
    for path in paths[1:]:
        part = faiss.read_index(str(path))
        rows = part.ntotal
        faiss.extract_index_ivf(merged).merge_from(faiss.extract_index_ivf(part), offset)  # moves part's lists out
        offset += rows
    merged.ntotal = offset
    return merged


def import_index(run: Run, _key: str) -> dict:
    """The index stage with the datastore's own index: linked as index.faiss (shards merged into one and
    written); the PQ error of every entry from it."""
    import faiss

    from knnlm_core.index import encode_with_error
    from precompute import knn_transformers as kt

    ds = peer(run)
    if len(ds.index_paths) == 1:
        link(ds.index_paths[0], run.path("index.faiss"))
    else:
        write_index(merge_shards(ds.index_paths), run.path("index.faiss"))
    index = kt.read_index_file(run.path("index.faiss"))
    keys = run.keys()  # (N, d) float16
    err = np.empty(len(keys))  # (N,) squared L2 ||k_i - k̂_i||²
    for lo in range(0, len(keys), CHUNK):
        block = np.ascontiguousarray(keys[lo:lo + CHUNK], dtype=np.float32)
        err[lo:lo + len(block)] = encode_with_error(index, block)[1]
    save_npz(run.path("pq.npz"), entry_pq_error=err)
    how = ds.index_paths[0].name if len(ds.index_paths) == 1 else f"{len(ds.index_paths)} shards merged"
    return {"index_train_seconds": 0.0, "index_ntotal": int(index.ntotal), "faiss_version": faiss.__version__,
            "index_encoder": f"imported ({how})"}


def imported_report(run_dir: Path) -> dict | None:
    """The check report of an imported run (import_check.json), None for a native run."""
    path = Path(run_dir) / CHECK_FILE
    return json.loads(path.read_text()) if path.is_file() else None
