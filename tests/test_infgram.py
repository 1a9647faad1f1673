"""Context novelty and the ∞-gram (SPEC §12): every quantity against a brute-force scan of D.

The reference scans every start offset of D for each pattern (numpy sliding windows), with
no suffix array; the streams are tiny, with a small alphabet so that long matches, tokens
that never occur in D and a context that matches D's last tokens all happen.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knnlm_core import infgram as ig
from knnlm_core.knn import softmax_weights


def occurrences(ids_d: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start offsets of every occurrence of `pattern` in D (brute force)."""
    if len(pattern) > len(ids_d):
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids_d, len(pattern))
    return np.flatnonzero((windows == pattern).all(axis=1))


def reference(ids_d: np.ndarray, ids_e: np.ndarray, t: int, max_len: int) -> tuple[int, float, int, int, int]:
    """(L_t, p_inf, suffix len, count(s ·), count(s y)) at position t by scanning D."""
    m, y = len(ids_d), ids_e[t + 1]
    match = max((n for n in range(1, min(max_len, t + 1) + 1) if len(occurrences(ids_d, ids_e[t - n + 1 : t + 1]))),
                default=0)
    for n in range(match, 0, -1):
        starts = occurrences(ids_d, ids_e[t - n + 1 : t + 1])
        starts = starts[starts + n <= m - 1]  # followed by a token: ends before D's last token
        if len(starts):
            hit = int((ids_d[starts + n] == y).sum())
            return match, hit / len(starts), n, len(starts), hit
    hit = int((ids_d[1:] == y).sum())  # the empty suffix: the unigram over the entries' values
    return match, hit / (m - 1), 0, m - 1, hit


def check_against_scan(ids_d: np.ndarray, ids_e: np.ndarray, max_len: int) -> None:
    sa = ig.build_suffix_array(ids_d)
    positions = np.arange(len(ids_e) - 1)
    got = ig.infgram(sa, ids_d, ids_e, positions, max_len)
    want = np.array([reference(ids_d, ids_e, int(t), max_len) for t in positions])  # (T, 5)
    np.testing.assert_array_equal(got.ctx_match_len, want[:, 0])
    np.testing.assert_allclose(got.p_inf, want[:, 1], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(got.inf_suffix_len, want[:, 2])
    np.testing.assert_array_equal(got.inf_count, want[:, 3])
    np.testing.assert_array_equal(got.inf_target_count, want[:, 4])
    np.testing.assert_array_equal(ig.ctx_match_len(sa, ids_d, ids_e, positions, max_len), want[:, 0])


def test_suffix_array_is_the_sorted_order_of_the_suffixes():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, size=400).astype(np.int32)  # two-byte tokens: pydivsufsort's integer path
    ids[100:140] = ids[300:340]  # long repeats
    sa = ig.build_suffix_array(ids)
    assert sa.shape == (400,) and sa.dtype == np.int32
    want = sorted(range(len(ids)), key=lambda i: ids[i:].tolist())
    np.testing.assert_array_equal(sa, want)


def test_every_position_matches_a_scan_of_the_datastore():
    rng = np.random.default_rng(1)
    ids_d = rng.integers(0, 6, size=500).astype(np.int32)
    ids_e = rng.integers(0, 8, size=300).astype(np.int32)  # tokens 6 and 7 never occur in D
    ids_e[50:90] = ids_d[200:240]  # a long copied stretch: L_t reaches the cap
    ids_e[120:135] = ids_d[-15:]  # a context that ends like D itself
    check_against_scan(ids_d, ids_e, max_len=12)
    got = ig.infgram(ig.build_suffix_array(ids_d), ids_d, ids_e, np.arange(299), 12)
    assert (got.ctx_match_len[ids_e[:-1] >= 6] == 0).all() and (got.ctx_match_len == 12).any()


def test_the_end_of_the_datastore_and_unseen_tokens():
    # D = 1 2 3 9: "3" occurs only as D's last token after "2"; 9 only at the end; 5 never
    ids_d = np.array([1, 2, 3, 1, 2, 4, 2, 3, 9], dtype=np.int32)
    ids_e = np.array([1, 2, 3, 9, 5, 2, 3, 1, 9, 9], dtype=np.int32)
    sa = ig.build_suffix_array(ids_d)
    got = ig.infgram(sa, ids_d, ids_e, np.arange(len(ids_e) - 1), max_len=8)
    # t=3: context 2 3 9 occurs only as D's end, 9 is never followed: the empty suffix over all 8 entries,
    # and the target 5 is no entry's value
    assert got.ctx_match_len[3] == 3 and got.inf_suffix_len[3] == 0 and got.inf_count[3] == 8
    assert got.p_inf[3] == 0
    # t=4: token 5 never occurs: L = 0, unigram of 2 (values 2 at D[1], D[4], D[6])
    assert got.ctx_match_len[4] == 0 and got.p_inf[4] == pytest.approx(3 / 8)
    # t=2: context 1 2 3 occurs once, followed by 1; target 9: p = 0 (the ∞-gram is not smoothed)
    assert got.inf_suffix_len[2] == 3 and got.inf_count[2] == 1 and got.p_inf[2] == 0
    check_against_scan(ids_d, ids_e, max_len=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=60), st.lists(st.integers(0, 5), min_size=2, max_size=40),
       st.integers(1, 9))
def test_random_streams_match_a_scan(ds, ev, max_len):
    check_against_scan(np.array(ds, dtype=np.int32), np.array(ev, dtype=np.int32), max_len)


def test_a_subset_of_positions_gives_the_same_values():
    rng = np.random.default_rng(2)
    ids_d = rng.integers(0, 4, size=300).astype(np.int32)
    ids_e = rng.integers(0, 4, size=200).astype(np.int32)
    sa = ig.build_suffix_array(ids_d)
    full = ig.infgram(sa, ids_d, ids_e, np.arange(199), 10)
    some = np.array([150, 3, 77, 77, 0, 198])  # unsorted, repeated, both ends
    part = ig.infgram(sa, ids_d, ids_e, some, 10)
    for name in ("ctx_match_len", "p_inf", "inf_suffix_len", "inf_count"):
        np.testing.assert_array_equal(getattr(part, name), getattr(full, name)[some])
    assert len(ig.infgram(sa, ids_d, ids_e, np.zeros(0, dtype=np.int64)).p_inf) == 0
    with pytest.raises(ValueError, match="positions"):
        ig.infgram(sa, ids_d, ids_e, np.array([199]))  # the last token has no target


def test_neighbour_overlap_equals_a_direct_comparison():
    rng = np.random.default_rng(3)
    ids_d = rng.integers(0, 3, size=400).astype(np.int32)
    ids_e = rng.integers(0, 3, size=150).astype(np.int32)
    ids_e[60:100] = ids_d[10:50]  # long overlaps with entries 10..49
    positions = np.arange(0, 150, 3)
    entry_ids = rng.integers(-1, len(ids_d) - 1, size=(len(positions), 12))
    entry_ids[:, 0] = np.clip(positions - 50, 0, None)  # aligned with the copied stretch
    entry_ids[:, 1] = 0  # the datastore's first entry: its context is one token
    got = ig.neighbour_overlap(ids_d, ids_e, positions, entry_ids, max_len=20)
    for r, t in enumerate(positions):
        for c, i in enumerate(entry_ids[r]):
            n = 0
            while i >= 0 and n < 20 and n <= min(t, i) and ids_e[t - n] == ids_d[i - n]:
                n += 1
            assert got[r, c] == n, (t, i)
    assert got.max() == 20 and (got[entry_ids == -1] == 0).all()


def test_copy_share_of_p_knn():
    dists = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    values = np.array([[7, 7, 8, -1], [8, 8, 8, 8], [7, 7, 7, 7]])
    overlap = np.array([[5, 0, 9, 0], [0, 0, 0, 0], [4, 3, 4, 0]])
    targets = np.array([7, 7, 7])
    w, _ = softmax_weights(dists, 10.0, values)
    share = ig.copy_share(w, values, targets, overlap)
    assert share[0] == pytest.approx(w[0, 0] / (w[0, 0] + w[0, 1]))  # the copy carrier of 7 over both carriers
    assert np.isnan(share[1])  # p_kNN = 0: no share to split
    assert share[2] == pytest.approx(0.5)  # overlaps 4 and 4 of four equal weights count; 3 does not


def test_context_length_bins():
    lengths = np.array([0, 1, 2, 3, 4, 7, 8, 15, 16, 64])
    np.testing.assert_array_equal(ig.ctx_len_bin(lengths), [0, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    assert len(ig.CTX_BIN_LABELS) == len(ig.CTX_BINS)
