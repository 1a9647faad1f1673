"""Where each value of a knn-transformers datastore lies in the token stream of a corpus (SPEC §13 c).

Rows: `KNNSaver.post_forward_hook` keeps keys[:, :-1] and labels[:, 1:] where the label is not -100, so
a row's value is the token after its key's position. `run_clm.py`'s `group_texts` concatenates the
tokenized lines of each `datasets.map` batch (1,000 lines), drops the remainder past a multiple of
block_size, and scores sliding windows (block_size, stride); the first token of each group has no key.
With stride == block_size (HF's original `group_texts`) each block's first token has no key.
`align` finds the segments of consecutive rows and `classify` names the rule they follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .format import CHUNK, DatastoreError

MATCH_LEN = 32  # values matched at once when (re)locating a row in the token stream
MAX_SKIP = 1 << 16  # stream tokens a new segment may skip (a group's dropped remainder < block_size)



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
