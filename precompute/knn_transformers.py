"""Datastores in knn-transformers' format: read them where they lie, check them, export a run (SPEC §13).

The format, read from neulab/knn-transformers `knnlm.py` at commit 5b370d2 (`KNNSaver`):
- `{dir}/dstore_{model_type}_{size}_{dim}_keys.npy`: a raw `np.memmap` (no .npy header despite the
  extension), float16 (size, dim); `..._vals.npy`: raw int32 (size, 1). Size and dim live only in the name.
- `{dir}/index_{model_type}_{size}_{dim}.indexed`: `IndexIVFPQ(IndexFlatL2(d), d, 4096, 64, 8)` trained
  on <= 1M keys, `add_with_ids(arange)`, read with `IO_FLAG_ONDISK_SAME_DIR`, nprobe 32.
- Rows: `KNNSaver.post_forward_hook` keeps keys[:, :-1] and labels[:, 1:] where the label is not -100, so
  a row's value is the token after its key's position. `run_clm.py`'s `group_texts` concatenates the
  tokenized lines of each `datasets.map` batch (1,000 lines), drops the remainder past a multiple of
  block_size, and scores sliding windows (block_size, stride); the first token of each group has no key.
  With stride == block_size (HF's original `group_texts`) each block's first token has no key.
- Sharded indexes: several files `index_{model_type}_{size}_{dim}.indexed.<k>` (k = 0, 1, ...), each with
  shard-local ids 0..n_k-1, read as one index with global ids = shard offset + local id. One file whose
  ids repeat (CUPalex/knnlm's `update_index` adds each chunk with `arange(chunk)`) is refused: which
  chunk an entry came from is not recoverable from the file.

Checks (SPEC §13 a-d), each a one-line `DatastoreError` naming the fix: file sizes vs names; values
within the tokenizer's vocabulary (int16 overflow recognised); the index's d, ntotal and ids; the token
stream of the named corpus aligned with the values (rule recorded); the keys of a sample of rows
recomputed with the model (`precompute.extract`'s key, SPEC §1) equal to the stored ones to fp16
precision, or, without keys, each sampled row among the index's first neighbours of its recomputed key.

CLI: `python -m precompute.knn_transformers check --dir DIR --model M --corpus C [--sample N]` and
`python -m precompute.knn_transformers export --run-dir R --out DIR`; exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

PEER = "neulab/knn-transformers"
PEER_COMMIT = "5b370d2"  # knnlm.py / run_clm.py read at this commit
KEYS_RE = re.compile(r"^dstore_(?P<mt>.+)_(?P<size>\d+)_(?P<dim>\d+)_keys\.npy$")
VALS_RE = re.compile(r"^dstore_(?P<mt>.+)_(?P<size>\d+)_(?P<dim>\d+)_vals\.npy$")
SHARD_RE = re.compile(r"\.indexed\.(\d+)$")
MATCH_LEN = 32  # values matched at once when (re)locating a row in the token stream
MAX_SKIP = 1 << 16  # stream tokens a new segment may skip (a group's dropped remainder < block_size)
KEY_TOL = 1e-2  # relative L2 difference ||k_stored - k||/||k|| allowed per row (fp16 storage ~5e-4)
KEY_SHARE = 0.95  # share of sampled rows that must be within KEY_TOL
SELF_K = 16  # without keys: the row must be among this many first neighbours of its recomputed key
SELF_SHARE = 0.8  # ... for at least this share of the sample
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


# ---------------------------------------------------------------- values

def check_values(values: np.ndarray, vocab_size: int, path: Path) -> None:
    """SPEC §13 (b): every value in 0..vocab_size-1; int16 overflow (negatives that +65536 makes valid) named."""
    lo, hi, n_neg, n_big = 0, 0, 0, 0
    neg_ok = True  # every negative value read as a wrapped int16 is a valid id
    for start in tqdm(range(0, len(values), CHUNK), desc="values", unit="block", leave=False, disable=None):
        block = np.asarray(values[start:start + CHUNK])
        lo, hi = min(lo, int(block.min())), max(hi, int(block.max()))
        neg = block[block < 0]
        n_neg += len(neg)
        n_big += int((block >= vocab_size).sum())
        neg_ok &= bool(((neg >= -32768) & (neg + 65536 < vocab_size)).all())
    if n_neg and neg_ok and hi < 32768:
        raise DatastoreError(f"{path.name}: {n_neg:,} negative values in [{lo}, -1], all valid ids after +65536: "
                             "the values overflowed int16 (knnlm #6); rebuild them as int32 (the keys can stay)")
    if n_neg or n_big:
        raise DatastoreError(f"{path.name}: values span [{lo}, {hi}], the tokenizer has {vocab_size:,} ids "
                             f"({n_neg:,} negative, {n_big:,} too large): the datastore belongs to another "
                             "tokenizer or is corrupt; name the model that built it")


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


# ---------------------------------------------------------------- alignment with the token stream

@dataclass
class Alignment:
    """Where each row's value lies in the token stream: segments of consecutive rows.

    Segment s: rows [row[s], row[s] + length[s]) have values stream[target[s] + j], and their keys are
    positions target[s] + j - 1 of a text that starts at target[s] - 1 (its first token has no key).
    """

    rule: str
    row: np.ndarray  # (S,) int64 first row of each segment
    target: np.ndarray  # (S,) int64 stream position of its first value
    length: np.ndarray  # (S,) int64 rows in it
    skipped: int = 0  # stream tokens between segments that are neither key position nor value

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment, offset in it) of each row."""
        seg = np.searchsorted(self.row, rows, side="right") - 1
        return seg, rows - self.row[seg]

    def key_positions(self, rows: np.ndarray) -> np.ndarray:
        """Stream position of each row's key (its last context token; its value is at + 1), int64."""
        seg, off = self.locate(np.asarray(rows, dtype=np.int64))
        return self.target[seg] + off - 1

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The segments as arrays (np.savez into a run: `row`, `target`, `length`)."""
        return {"row": self.row, "target": self.target, "length": self.length}


def run_length(values: np.ndarray, stream: np.ndarray, row: int, pos: int) -> int:
    """How many rows from `row` have values equal to stream[pos], stream[pos + 1], ... (blocks that double)."""
    n = min(len(values) - row, len(stream) - pos)
    done, step = 0, 4096
    while done < n:
        step = min(step, n - done)
        diff = np.flatnonzero(np.asarray(values[row + done:row + done + step]) != stream[pos + done:pos + done + step])
        if len(diff):
            return done + int(diff[0])
        done, step = done + step, min(2 * step, CHUNK)
    return n


def find_next(values: np.ndarray, stream: np.ndarray, row: int, lo: int, hi: int) -> int | None:
    """First stream position p in [lo, hi) where values[row:row+m] == stream[p:p+m] (m = MATCH_LEN), or None."""
    want = np.asarray(values[row:row + MATCH_LEN])
    m = len(want)
    hi = min(hi, len(stream) - m + 1)
    start, step = lo, 1024
    while start < hi:
        stop = min(start + step, hi)
        cand = start + np.flatnonzero(stream[start:stop] == want[0])
        if len(cand):
            ok = (stream[cand[:, None] + np.arange(m)] == want).all(axis=1)
            if ok.any():
                return int(cand[np.argmax(ok)])
        start, step = stop, min(2 * step, CHUNK)
    return None


def offset_share(values: np.ndarray, stream: np.ndarray, offset: int = 1) -> float:
    """Share of rows i with values[i] == stream[i + offset] (what the plain rule would match)."""
    n = min(len(values), len(stream) - offset)
    if n <= 0:
        return 0.0
    return float(np.mean(np.asarray(values[:n]) == stream[offset:offset + n]))


def align(values: np.ndarray, stream: np.ndarray, corpus: str = "the corpus") -> Alignment:
    """Segments placing every value in `stream` (SPEC §13 c), classified as a rule; DatastoreError if none."""
    n = len(values)
    first = find_next(values, stream, 0, 1, len(stream))
    if first is None:
        raise DatastoreError(f"the first {min(MATCH_LEN, n)} values occur nowhere in the {len(stream):,}-token stream "
                             f"of {corpus} (values[i] == stream[i + 1] for {offset_share(values, stream):.1%} of rows):"
                             " the datastore was built from another text or tokenizer; name the corpus that built it")
    rows, targets, lengths = [], [], []
    row, pos = 0, first
    with tqdm(total=n, desc="align values", unit="row", leave=False, disable=None) as bar:
        while row < n:
            run = run_length(values, stream, row, pos)
            if run == 0:
                break
            rows.append(row), targets.append(pos), lengths.append(run)
            row, pos = row + run, pos + run
            bar.update(run)
            if row < n:
                nxt = find_next(values, stream, row, pos + 1, pos + 1 + MAX_SKIP)
                if nxt is None:
                    break
                pos = nxt
    if row < n:
        raise DatastoreError(f"values follow the stream of {corpus} for rows 0..{row - 1} ({row / n:.1%} of {n:,}), "
                             f"then row {row}'s next values occur nowhere in the following {MAX_SKIP:,} tokens: the "
                             "datastore was built from another (or longer) text; name the corpus that built it")
    row_a, target_a, length_a = (np.asarray(x, dtype=np.int64) for x in (rows, targets, lengths))
    skipped = int((target_a[1:] - (target_a[:-1] + length_a[:-1]) - 1).sum()) if len(row_a) > 1 else 0
    return classify(values, stream, Alignment("", row_a, target_a, length_a, skipped))


def classify(values: np.ndarray, stream: np.ndarray, found: Alignment) -> Alignment:
    """Name the rule of `found`: one contiguous run, regular blocks (verified on every row), or segments."""
    off = int(found.target[0])
    if len(found.row) == 1:
        found.rule = f"contiguous: values[i] == stream[i + {off}]"
        return found
    block = int(np.bincount(found.length[:-1]).argmax()) + 1  # rows per block + the keyless first token
    n = len(values)

    def block_pos(lo: int, hi: int) -> np.ndarray:  # (hi - lo,) stream position of rows lo..hi-1's values
        rows = np.arange(lo, hi, dtype=np.int64)
        return off + (rows // (block - 1)) * block + rows % (block - 1)

    if block >= 2 and block_pos(n - 1, n)[0] < len(stream) and all(
            (np.asarray(values[s:s + CHUNK]) == stream[block_pos(s, min(s + CHUNK, n))]).all()
            for s in range(0, n, CHUNK)):
        starts = np.arange(0, n, block - 1, dtype=np.int64)
        lengths = np.minimum(block - 1, n - starts)
        found = Alignment(f"blocks of {block} tokens, the first without a key: values[i] == "
                          f"stream[{off} + (i // {block - 1})·{block} + i % {block - 1}]",
                          starts, off + (starts // (block - 1)) * block, lengths, len(starts) - 1)
        return found
    found.rule = (f"{len(found.row):,} contiguous segments (values[i] == stream[i + offset], the offset growing by "
                  f"{found.skipped:,} skipped tokens in all; e.g. per-1000-line groups with the remainder dropped), "
                  f"first value at stream[{off}]")
    return found


# ---------------------------------------------------------------- keys of a sample

def segment_windows(align_: Alignment, seg: int, max_context: int, stride: int, cache: dict):
    """The project's windows (knnlm_core.windows) over segment `seg`'s text, cached per segment."""
    from knnlm_core.windows import plan_windows

    if seg not in cache:
        cache[seg] = plan_windows(int(align_.length[seg]) + 1, max_context, stride)
    return cache[seg]


def recompute_keys(lm, stream: np.ndarray, align_: Alignment, rows: np.ndarray, max_context: int,
                   stride: int, batch_size: int = 8) -> np.ndarray:
    """Keys (float32, (n, d)) of `rows`, computed with the model over each row's segment, windowed as SPEC §1.

    Only the windows owning a sampled row run, `batch_size` windows of one length per forward pass."""
    from knnlm_core.model import forward_windows
    from knnlm_core.windows import Window

    seg, off = align_.locate(rows)
    cache: dict = {}
    todo: dict[tuple[int, int], list[int]] = {}  # (segment, window) -> sample indices it owns
    for i, (s, j) in enumerate(zip(seg.tolist(), off.tolist(), strict=True)):
        windows = segment_windows(align_, s, max_context, stride, cache)
        todo.setdefault((s, bisect_right([x.first_pos for x in windows], j) - 1), []).append(i)
    by_len: dict[int, list[tuple[int, int]]] = {}
    for s, w in todo:
        by_len.setdefault(cache[s][w].end - cache[s][w].begin, []).append((s, w))
    out = np.empty((len(rows), lm.dim), dtype=np.float32)  # (n, d)
    with tqdm(total=len(todo), desc="recompute keys", unit="window", leave=False, disable=None) as bar:
        for items in by_len.values():
            for b in range(0, len(items), batch_size):
                chunk = items[b:b + batch_size]
                texts, batch = [], []  # each window's tokens laid end to end, windows re-based onto them
                for s, w in chunk:
                    win, start = cache[s][w], int(align_.target[s]) - 1  # segment text = stream[start:]
                    base = sum(len(t) for t in texts)
                    texts.append(stream[start + win.begin:start + win.end])
                    batch.append(Window(base, base + win.end - win.begin, base + win.first_pos - win.begin))
                keys, _ = forward_windows(lm, np.concatenate(texts), batch, with_logits=False)
                for (s, w), k in zip(chunk, keys, strict=True):
                    for i in todo[(s, w)]:
                        out[i] = k[int(off[i]) - cache[s][w].first_pos]
                bar.update(len(chunk))
    return out


@dataclass
class KeyCheck:
    """How the recomputed keys of the sample compare with what the datastore holds (SPEC §13 d)."""

    method: str  # "stored keys" | "index self-retrieval"
    sample: int
    share_ok: float  # share of sampled rows that pass
    required: float  # share needed
    median: float  # median relative difference (stored keys) or median rank of the row itself
    worst: float
    criterion: str


def compare_keys(stored: np.ndarray, recomputed: np.ndarray, tol: float = KEY_TOL) -> KeyCheck:
    """Relative L2 difference per row between stored fp16 keys and recomputed ones (rounded to fp16 first)."""
    ref = recomputed.astype(np.float16).astype(np.float64)  # (n, d): what an fp16 writer would have stored
    diff = np.linalg.norm(stored.astype(np.float64) - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    return KeyCheck("stored keys", len(diff), float(np.mean(diff <= tol)), KEY_SHARE, float(np.median(diff)),
                    float(diff.max()), f"||k_stored - k||/||k|| <= {tol:g} (fp16 storage ~5e-4)")


def self_retrieval(index, recomputed: np.ndarray, rows: np.ndarray, k: int = SELF_K) -> KeyCheck:
    """Rank of each row among the index's first k neighbours of its recomputed key (k + 1 when absent)."""
    from knnlm_core.index import search

    _, ids = search(index, recomputed, k)  # (n, k)
    hit = ids == rows[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, k + 1)
    return KeyCheck("index self-retrieval", len(rows), float(np.mean(rank <= k)), SELF_SHARE,
                    float(np.median(rank)), float(rank.max()), f"the row itself among the first {k} neighbours")


# ---------------------------------------------------------------- the whole check

@dataclass
class CheckReport:
    """What was checked and found; `to_dict` goes into a run's manifest."""

    directory: str
    model_type: str
    size: int
    dim: int
    has_keys: bool
    index_files: list[str]
    vocab_size: int
    stream_tokens: int
    rule: str
    segments: int
    skipped_tokens: int
    max_context: int
    stride: int
    keys: dict = field(default_factory=dict)
    peer: str = f"{PEER}@{PEER_COMMIT}"
    alignment: Alignment | None = field(default=None, repr=False, compare=False)  # row -> stream position

    def to_dict(self) -> dict:
        """Every field but the alignment arrays (save those with `alignment.to_arrays()`)."""
        return {k: v for k, v in asdict(self).items() if k != "alignment"}


def check_shape(ds: PeerDatastore, lm) -> None:
    """The names' model type and dimension against the model's."""
    if ds.model_type != lm.model_type:
        raise DatastoreError(f"the datastore's files name model type {ds.model_type!r}, the model is "
                             f"{lm.model_type!r}: name the model that built it")
    if ds.dim != lm.dim:
        raise DatastoreError(f"the datastore's keys have dimension {ds.dim}, the model's key dimension is {lm.dim}: "
                             "name the model that built it")


def check_datastore(ds: PeerDatastore, lm, vocab_size: int, stream: np.ndarray, corpus: str = "the corpus",
                    sample: int = 64, max_context: int = 0, stride: int = 0, seed: int = 0,
                    nprobe: int = 32) -> tuple[CheckReport, object]:
    """Every SPEC §13 check in order (cheap first); returns (report, the opened index or None)."""
    check_file_sizes(ds)
    check_shape(ds, lm)
    values = open_values(ds)
    check_values(values, vocab_size, ds.values_path)
    index = open_index(ds, nprobe)
    keys = open_keys(ds)
    if keys is None and index is None:
        raise DatastoreError(f"{ds.directory} has neither {ds.prefix()}_keys.npy nor {index_name(ds.model_type, ds.size, ds.dim)}"
                             ": nothing to compare recomputed keys with; copy the keys or the index there")
    alignment = align(values, stream, corpus)
    max_context = max_context or min(lm.n_positions, 1024)
    stride = stride or max_context // 2
    rows = np.sort(np.random.default_rng(seed).choice(ds.size, size=min(sample, ds.size), replace=False))
    recomputed = recompute_keys(lm, stream, alignment, rows, max_context, stride)  # (n, d)
    if keys is not None:
        result = compare_keys(np.asarray(keys[rows]), recomputed)
        what = "relative key difference"
    else:
        result = self_retrieval(index, recomputed, rows)
        what = "rank of the row itself"
    if result.share_ok < result.required:
        raise DatastoreError(
            f"keys of {ds.prefix()} do not belong to this model: {result.share_ok:.0%} of {result.sample} sampled "
            f"rows pass ({result.criterion}; median {what} {result.median:.3g}, worst {result.worst:.3g}, "
            f"{result.required:.0%} needed; windows {max_context}/{stride}, rule {alignment.rule.split(':')[0]}): "
            "name the model that built it, or its --max-context/--stride")
    report = CheckReport(str(ds.directory), ds.model_type, ds.size, ds.dim, keys is not None,
                         [p.name for p in ds.index_paths], vocab_size, len(stream), alignment.rule,
                         len(alignment.row), alignment.skipped, max_context, stride, asdict(result),
                         alignment=alignment)
    return report, index


# ---------------------------------------------------------------- export

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


# ---------------------------------------------------------------- CLI

def load_inputs(model: str, tokenizer: str, corpus: str, limit: int, dtype: str, device: str):
    """(LoadedModel, tokenizer length, token stream of the corpus) with the project's loaders."""
    from knnlm_core.corpus import load_tokenizer, tokenize_file
    from knnlm_core.model import load_model

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(tokenizer or model)
    stream = tokenize_file(Path(corpus), tok, limit or None)
    return load_model(model, dtype, device), len(tok), stream


def cmd_check(args: argparse.Namespace) -> int:
    ds = find_datastore(Path(args.dir), args.size)
    check_file_sizes(ds)  # before loading a model: a wrong file costs nothing
    lm, vocab, stream = load_inputs(args.model, args.tokenizer, args.corpus, args.limit_tokens, args.dtype,
                                    args.device)
    report, _ = check_datastore(ds, lm, vocab, stream, args.corpus, args.sample, args.max_context, args.stride,
                                args.seed, args.nprobe)
    k = report.keys
    print(f"ok: {ds.prefix()} ({report.size:,} x {report.dim}, keys {'present' if report.has_keys else 'absent'}, "
          f"index {', '.join(report.index_files) or 'absent'}) belongs to {args.model} over {args.corpus}")
    print(f"alignment: {report.rule}")
    print(f"keys: {k['method']}, {k['share_ok']:.0%} of {k['sample']} rows pass ({k['criterion']}; median "
          f"{k['median']:.3g}, worst {k['worst']:.3g})")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    info = export_run(Path(args.run_dir), Path(args.out), args.nlist, args.m)
    print(f"exported {info['size']:,} x {info['dim']} to {info['out']}; index: {info['index']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m precompute.knn_transformers", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check that a knn-transformers datastore belongs to a model and a text")
    c.add_argument("--dir", required=True, help="folder with dstore_<type>_<size>_<dim>_{keys,vals}.npy")
    c.add_argument("--model", required=True, help="hub name or local directory of the model")
    c.add_argument("--corpus", required=True, help="the text that built the datastore (project corpus file)")
    c.add_argument("--tokenizer", default="", help="tokenizer; default: the model's")
    c.add_argument("--size", type=int, default=None, help="which datastore when the folder holds several")
    c.add_argument("--limit-tokens", type=int, default=0, help="tokenize only the first N tokens (0 = all)")
    c.add_argument("--sample", type=int, default=64, help="rows whose keys are recomputed")
    c.add_argument("--max-context", type=int, default=0, help="window length (0 = model's, capped at 1024)")
    c.add_argument("--stride", type=int, default=0, help="window stride (0 = max-context // 2)")
    c.add_argument("--nprobe", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c.add_argument("--json", default="", help="also write the report to this JSON file")
    c.set_defaults(func=cmd_check)
    e = sub.add_parser("export", help="write a run's datastore and index in knn-transformers' format")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--out", required=True, help="new (or empty) folder to create")
    e.add_argument("--nlist", type=int, default=4096, help="IVF lists when the run's index must be rebuilt")
    e.add_argument("--m", type=int, default=64, help="PQ sub-quantizers when the run's index must be rebuilt")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from knnlm_core.corpus import CorpusError
    from knnlm_core.keystore import KeyStoreError
    from knnlm_core.model import ModelError

    try:
        return args.func(args)
    except (DatastoreError, CorpusError, KeyStoreError, ModelError, OSError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
