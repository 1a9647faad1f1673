"""Checks that a knn-transformers datastore belongs to a model and a text (SPEC §13 b-d).

Each refusal is a one-line `DatastoreError` naming the fix: values within the tokenizer's vocabulary
(int16 overflow recognised); the token stream of the named corpus aligned with the values (`align`,
rule recorded); the keys of a sample of rows recomputed with the model (`precompute.extract`'s key,
SPEC §1) equal to the stored ones to fp16 precision, or, without keys, each sampled row among the
index's first neighbours of its recomputed key. `check_datastore` runs them all, cheap first, after
the file checks of `format`.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .align import Alignment, align
from .format import (
    CHUNK,
    PEER,
    PEER_COMMIT,
    DatastoreError,
    PeerDatastore,
    check_file_sizes,
    index_name,
    open_index,
    open_keys,
    open_values,
)

KEY_TOL = 1e-2  # relative L2 difference ||k_stored - k||/||k|| allowed per row (fp16 storage ~5e-4)
KEY_SHARE = 0.95  # share of sampled rows that must be within KEY_TOL
SELF_K = 16  # without keys: the row must be among this many first neighbours of its recomputed key
SELF_SHARE = 0.8  # ... for at least this share of the sample


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
