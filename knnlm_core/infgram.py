"""Context novelty and the ∞-gram estimate over a suffix array of the datastore stream (SPEC §12).

D is the datastore token stream (entry i: last context token D[i], value D[i+1]; N = len(D) - 1
entries) and E an evaluation stream (position t: context E[..t], target E[t+1]). `sa` is the
suffix array of D (`build_suffix_array`, pydivsufsort): the start offsets of D's suffixes in
lexicographic order, a shorter suffix before any longer one it is a prefix of. A pattern's
occurrences are then one contiguous range of `sa`, found by binary search.

Every search runs for all positions at once: each step of the binary search compares one suffix
per position with that position's pattern (a window of E), starting after the prefix the range's
two boundary suffixes are known to share with the pattern (Manber & Myers), one token per round
over the rows still tied, so a step mostly reads one token per position, not the whole pattern.

Definitions (SPEC §12):
- `ctx_match_len` L_t: the largest n <= max_len with E[t-n+1..t] occurring in D; 0 if E[t] never does.
- ∞-gram (Liu et al. 2024): s = the longest suffix of E[..t] (<= max_len tokens) that occurs in D
  followed by a token, i.e. as the context of some entry; an occurrence ending at D's last token
  does not count. p_∞(y) = count(s y) / count(s ·). When no non-empty suffix qualifies (E[t] is
  never the context of an entry), s is empty and p_∞ is the unigram over the entries' values:
  count(s ·) = N and count(s y) = freq(y) (SPEC §3), so p_∞ > 0 whenever y is some entry's value.
  (A token that occurs only as D[0] is no entry's value: freq 0, p_∞ 0.) Like the ∞-gram of the
  paper, the estimate is not smoothed: p_∞ = 0 when s never precedes y.
- `neighbour_overlap`: longest common suffix of the query's context E[..t] and neighbour entry
  i's context D[..i]; a neighbour with overlap >= COPY_MIN_OVERLAP is a copy neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_LEN = 64  # SPEC §12 default cap on L_t and on the ∞-gram suffix
COPY_MIN_OVERLAP = 4  # SPEC §12: overlap >= 4 tokens makes a neighbour a copy neighbour
CTX_BINS = np.array([0, 1, 2, 4, 8, 16])  # left edges of the L_t bins: 0, 1, 2–3, 4–7, 8–15, 16+
CTX_BIN_LABELS = ("0", "1", "2–3", "4–7", "8–15", "16+")
BLOCK = 1 << 16  # positions searched together (bounds the (positions, max_len) temporaries)


def build_suffix_array(ids: np.ndarray) -> np.ndarray:
    """Suffix array (len(ids),) of a token stream: int32 below 2^31 bytes of text, else int64.

    pydivsufsort sorts the stream's big-endian bytes at the minimal token width and keeps the
    suffixes that start on a token boundary, which is the token-level suffix order.
    """
    from pydivsufsort import divsufsort

    ids = np.ascontiguousarray(ids)
    if ids.ndim != 1 or len(ids) == 0 or ids.dtype.kind not in "iu":
        raise ValueError("the suffix array needs a non-empty 1-d integer token stream")
    return divsufsort(ids)


def ctx_len_bin(match_len: np.ndarray) -> np.ndarray:
    """Index into CTX_BIN_LABELS (int8, same shape) of each context match length."""
    return (np.searchsorted(CTX_BINS, np.asarray(match_len), side="right") - 1).astype(np.int8)


@dataclass
class Streams:
    """The suffix array of D, D and E, as given (memory-mapped arrays are read in place, not copied)."""

    sa: np.ndarray  # (M,) suffix array of D
    d: np.ndarray  # (M,) D
    e: np.ndarray  # (len(E),) E
    m: int  # len(D)

    @classmethod
    def of(cls, sa: np.ndarray, ids_d: np.ndarray, ids_e: np.ndarray) -> Streams:
        if len(sa) != len(ids_d):
            raise ValueError(f"suffix array has {len(sa):,} entries, the datastore stream {len(ids_d):,} tokens")
        return cls(sa, ids_d, ids_e, len(ids_d))


def _compare(s: Streams, starts: np.ndarray, pstart: np.ndarray, plen: np.ndarray,
             known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compare suffixes D[starts:] with patterns E[pstart : pstart + plen], the first `known` tokens
    of each pair being equal already. Returns (sign (R,) int8: -1 suffix smaller, 0 suffix begins
    with the pattern, 1 larger; lcp (R,) int64 <= plen).

    One token per round over the rows still tied: most rows differ at the first token compared, and
    1-d gathers over the shrinking tie set cost less than fixed-width windows (measured ~1.5x)."""
    sign = np.zeros(len(starts), dtype=np.int8)
    lcp = known.astype(np.int64)
    tied = np.flatnonzero(lcp < plen)
    while tied.size:
        at = lcp[tied]
        read = starts[tied] + at
        ended = read >= s.m  # the suffix is a proper prefix of the pattern: it sorts first
        a, b = s.d[np.minimum(read, s.m - 1)], s.e[pstart[tied] + at]
        differ = (a != b) | ended
        sign[tied[differ]] = np.where(((a < b) | ended)[differ], -1, 1)
        tied = tied[~differ]
        lcp[tied] += 1
        tied = tied[lcp[tied] < plen[tied]]
    return sign, lcp


def _bound(s: Streams, pstart: np.ndarray, plen: np.ndarray, lo: np.ndarray, hi: np.ndarray,
           upper: bool, known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Binary search of sa[lo:hi] per row: the first index whose suffix is >= the pattern (`upper`
    False) or > it (`upper` True), comparing the pattern's plen tokens. `known` = tokens every suffix
    in the range shares with the pattern. Returns (index (R,), lcp of the pattern with the suffixes
    at index - 1 and index, the larger of the two (R,))."""
    lo, hi = lo.astype(np.int64), hi.astype(np.int64)
    known = np.zeros(len(lo), dtype=np.int64) if known is None else known.astype(np.int64)
    lcp_lo, lcp_hi = known.copy(), known.copy()  # lcp with the range's boundary suffixes (Manber & Myers)
    best = np.zeros(len(lo), dtype=np.int64)
    act = np.flatnonzero(lo < hi)
    while act.size:
        mid = (lo[act] + hi[act]) // 2
        sign, lcp = _compare(s, np.asarray(s.sa[mid], dtype=np.int64), pstart[act], plen[act],
                             np.minimum(lcp_lo[act], lcp_hi[act]))
        right = sign <= 0 if upper else sign < 0
        go, stay = act[right], act[~right]
        lo[go], lcp_lo[go] = mid[right] + 1, lcp[right]
        hi[stay], lcp_hi[stay] = mid[~right], lcp[~right]
        best[act] = np.maximum(best[act], lcp)
        act = act[lo[act] < hi[act]]
    return lo, best


def _pattern_range(s: Streams, pstart: np.ndarray, plen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of sa holding the suffixes that begin with E[pstart : pstart + plen] (plen >= 1)."""
    zero, end = np.zeros(len(pstart), dtype=np.int64), np.full(len(pstart), s.m, dtype=np.int64)
    lo, _ = _bound(s, pstart, plen, zero, end, upper=False)
    hi, _ = _bound(s, pstart, plen, lo, end, upper=True)
    return lo, hi


def _matching_stats(s: Streams, starts: np.ndarray, max_len: int) -> np.ndarray:
    """ms (R,): length of the longest prefix of E[j : j + max_len] occurring in D, for each start j."""
    plen = np.minimum(max_len, len(s.e) - starts).astype(np.int64)
    zero, end = np.zeros(len(starts), dtype=np.int64), np.full(len(starts), s.m, dtype=np.int64)
    _, best = _bound(s, starts, plen, zero, end, upper=False)  # the longest match neighbours the insertion point
    return best


def _match_len(s: Streams, positions: np.ndarray, max_len: int) -> np.ndarray:
    """L_t (T,) int32 for sorted-or-not positions, from the matching statistics of the window starts."""
    if not positions.size:
        return np.zeros(0, dtype=np.int32)
    lag = np.arange(max_len)  # k: the suffix E[t-k..t] has length k + 1
    base = max(int(positions.min()) - max_len + 1, 0)
    wanted = np.zeros(int(positions.max()) + 1 - base, dtype=bool)  # window starts any position needs
    for k in lag:
        wanted[positions[positions - k >= base] - k - base] = True
    needed = np.flatnonzero(wanted) + base
    slot = np.cumsum(wanted) - 1  # start j -> its index in `needed`
    ms = np.concatenate([_matching_stats(s, needed[a : a + BLOCK], max_len) for a in range(0, len(needed), BLOCK)])
    starts = positions[:, None] - lag  # (T, max_len)
    found = (starts >= base) & (ms[slot[np.maximum(starts - base, 0)]] > lag)
    # E[t-k..t] occurs iff the longest match starting at t-k reaches t; those k are 0..L_t-1.
    return found.sum(axis=1).astype(np.int32)


def _check(ids_e: np.ndarray, positions: np.ndarray, need_target: bool) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64)
    last = len(ids_e) - (2 if need_target else 1)
    if positions.ndim != 1 or (positions.size and (positions.min() < 0 or positions.max() > last)):
        raise ValueError(f"positions must be a 1-d array within 0..{last}")
    return positions


def ctx_match_len(sa: np.ndarray, ids_d: np.ndarray, ids_e: np.ndarray, positions: np.ndarray,
                  max_len: int = MAX_LEN) -> np.ndarray:
    """L_t (T,) int32: the largest n <= max_len with E[t-n+1..t] occurring in D (0: E[t] never does)."""
    positions = _check(ids_e, positions, need_target=False)
    s = Streams.of(sa, ids_d, ids_e)
    return np.concatenate([np.zeros(0, dtype=np.int32)] +
                          [_match_len(s, positions[a : a + BLOCK], max_len) for a in range(0, len(positions), BLOCK)])


@dataclass
class InfGram:
    """Per evaluation position (T,): SPEC §12 context-novelty and ∞-gram columns."""

    ctx_match_len: np.ndarray  # int32 L_t
    p_inf: np.ndarray  # float64 count(s y) / count(s ·)
    inf_suffix_len: np.ndarray  # int32 |s| (0 = the unigram over the entries' values)
    inf_count: np.ndarray  # int64 count(s ·): entries whose context ends with s
    inf_target_count: np.ndarray  # int64 count(s y): of those, entries whose value is the target


def _context_count(s: Streams, pos: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count(s ·), lo, hi) for s = E[t-n+1..t] (n >= 1): occurrences of s in D minus the one that
    ends at D's last token (the shortest suffix of its range, so first in it) if there is one."""
    lo, hi = _pattern_range(s, pos - n + 1, n)
    at_end = (hi > lo) & (np.asarray(s.sa[np.minimum(lo, s.m - 1)], dtype=np.int64) == s.m - n)
    return hi - lo - at_end, lo, hi


def _infgram_block(s: Streams, pos: np.ndarray, max_len: int) -> InfGram:
    """InfGram of one block of positions (targets E[t+1])."""
    match = _match_len(s, pos, max_len)
    n = match.astype(np.int64)
    count = np.zeros(len(pos), dtype=np.int64)
    lo, hi = np.zeros_like(count), np.zeros_like(count)
    todo = np.flatnonzero(n > 0)
    while todo.size:  # shorten s while its only occurrence ends D (rare: one step back, almost always)
        c, a, b = _context_count(s, pos[todo], n[todo])
        count[todo], lo[todo], hi[todo] = c, a, b
        todo = todo[c == 0]
        n[todo] -= 1
        todo = todo[n[todo] > 0]
    target = s.e[pos + 1].astype(np.int64)
    hit = np.zeros_like(count)
    ctx = np.flatnonzero(n > 0)
    if ctx.size:  # s y: inside s's range every suffix shares s, so the search compares the token after it
        p, k = pos[ctx], n[ctx]
        y_lo, _ = _bound(s, p - k + 1, k + 1, lo[ctx], hi[ctx], upper=False, known=k)
        y_hi, _ = _bound(s, p - k + 1, k + 1, y_lo, hi[ctx], upper=True, known=k)
        hit[ctx] = y_hi - y_lo
    empty = np.flatnonzero(n == 0)
    if empty.size:  # the empty suffix: freq(y) = occurrences of y in D, less D[0] (no entry's value)
        y_lo, y_hi = _pattern_range(s, pos[empty] + 1, np.ones(len(empty), dtype=np.int64))
        hit[empty] = y_hi - y_lo - (target[empty] == int(s.d[0]))
        count[empty] = s.m - 1
    return InfGram(match, hit / np.maximum(count, 1), n.astype(np.int32), count, hit)


def infgram(sa: np.ndarray, ids_d: np.ndarray, ids_e: np.ndarray, positions: np.ndarray,
            max_len: int = MAX_LEN, progress=None) -> InfGram:
    """L_t and the ∞-gram estimate of the target E[t+1] at each position t (positions (T,), t <= len(E) - 2).

    `progress(n)` (optional) is called after each block of positions.
    """
    positions = _check(ids_e, positions, need_target=True)
    if len(ids_d) < 2:
        raise ValueError("the datastore stream needs at least 2 tokens (one entry)")
    s = Streams.of(sa, ids_d, ids_e)
    parts = [_infgram_block(s, positions[:0], max_len)]  # typed empty arrays when there is no position
    for a in range(0, len(positions), BLOCK):
        parts.append(_infgram_block(s, positions[a : a + BLOCK], max_len))
        if progress:
            progress(len(parts[-1].p_inf))
    return InfGram(*(np.concatenate([getattr(p, f) for p in parts]) for f in InfGram.__dataclass_fields__))


def _common_suffix(ids_a: np.ndarray, end_a: np.ndarray, ids_b: np.ndarray, end_b: np.ndarray,
                   limit: np.ndarray) -> np.ndarray:
    """Longest common suffix (R,) of ids_a[..end_a] and ids_b[..end_b], at most limit <= min(end) + 1."""
    lcs = np.zeros(len(end_a), dtype=np.int64)
    row = np.flatnonzero(limit > 0)
    at_a, at_b, left = end_a[row], end_b[row], limit[row]
    depth = 0
    while row.size:  # one token back per round over the pairs still equal, all of them `depth` deep
        same = ids_a[at_a] == ids_b[at_b]
        lcs[row[same]] = depth + 1
        go = same & (left > 1)
        row, at_a, at_b, left = row[go], at_a[go] - 1, at_b[go] - 1, left[go] - 1
        depth += 1
    return lcs


def neighbour_overlap(ids_d: np.ndarray, ids_e: np.ndarray, positions: np.ndarray, entry_ids: np.ndarray,
                      max_len: int = MAX_LEN) -> np.ndarray:
    """(T, s) int32: longest common suffix (<= max_len) of E[..t] and D[..entry] for each neighbour
    entry of each position t; 0 where the entry id is -1 (missing neighbour)."""
    positions = _check(ids_e, positions, need_target=False)
    entry_ids = np.asarray(entry_ids)
    if entry_ids.ndim != 2 or len(entry_ids) != len(positions):
        raise ValueError(f"entry_ids must be (T, s) with T = {len(positions)}, got {entry_ids.shape}")
    if entry_ids.size and entry_ids.max() >= len(ids_d) - 1:
        raise ValueError(f"entry id {entry_ids.max()} is not an entry of a {len(ids_d):,}-token datastore stream")
    out = np.zeros(entry_ids.shape, dtype=np.int32)
    rows, cols = np.nonzero(entry_ids >= 0)
    t, i = positions[rows], entry_ids[rows, cols].astype(np.int64)
    out[rows, cols] = _common_suffix(np.asarray(ids_e), t, np.asarray(ids_d), i,
                                     np.minimum(np.minimum(t, i) + 1, max_len))
    return out


def copy_share(weights: np.ndarray, nbr_values: np.ndarray, targets: np.ndarray, overlap: np.ndarray,
               min_overlap: int = COPY_MIN_OVERLAP) -> np.ndarray:
    """Share of p_kNN(target) (T,) carried by copy neighbours (overlap >= min_overlap): their summed
    normalised weight (knn.softmax_weights) over the weight of all neighbours carrying the target.
    NaN where p_kNN = 0 (no neighbour carries the target: no share to split); store it as NULL.
    `overlap` is read only where the neighbour carries the target (elsewhere any value will do)."""
    assert weights.shape == nbr_values.shape == overlap.shape and weights.ndim == 2
    carries = nbr_values == np.asarray(targets)[:, None]  # (T, k)
    p_knn = np.where(carries, weights, 0.0).sum(axis=1)
    copied = np.where(carries & (overlap >= min_overlap), weights, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p_knn > 0, copied / p_knn, np.nan)
