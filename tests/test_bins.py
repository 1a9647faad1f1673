"""Tests of knnlm_core.bins (SPEC §3): floor(log10(freq)) bins, -1 for unseen, labels and ranges."""

from __future__ import annotations

import numpy as np
import pytest

from knnlm_core.bins import UNSEEN_BIN, bin_label, bin_labels, bin_range, freq_bin


def test_freq_bin_hand_values():
    freq = np.array([0, 1, 9, 10, 11, 99, 100, 999, 1000, 9999, 10000, 10**6, 10**12 - 1, 10**12])
    expected = [-1, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 6, 11, 12]
    out = freq_bin(freq)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, expected)


def test_freq_bin_unseen_constant():
    assert UNSEEN_BIN == -1
    assert freq_bin(np.array([0]))[0] == UNSEEN_BIN


def test_freq_bin_matches_floor_log10():
    rng = np.random.default_rng(0)
    freq = np.concatenate([rng.integers(1, 10**7, size=2000), 10 ** np.arange(8), 10 ** np.arange(1, 8) - 1])
    expected = np.array([len(str(int(f))) - 1 for f in freq])  # exact: digit count - 1
    np.testing.assert_array_equal(freq_bin(freq), expected)
    np.testing.assert_array_equal(expected, np.floor(np.log10(freq.astype(np.float64))))


def test_freq_bin_keeps_shape_and_accepts_lists():
    np.testing.assert_array_equal(freq_bin([[0, 10], [1000, 5]]), [[-1, 1], [3, 0]])
    assert freq_bin(np.array([], dtype=np.int64)).shape == (0,)
    assert int(freq_bin(np.int64(42))) == 1


def test_freq_bin_rejects_negative():
    with pytest.raises(ValueError, match=">= 0"):
        freq_bin(np.array([3, -1]))


def test_bin_labels():
    assert bin_label(-1) == "unseen"
    assert bin_label(0) == "1–9"
    assert bin_label(1) == "10–99"
    assert bin_label(2) == "100–999"
    assert bin_label(3) == "1,000–9,999"
    assert bin_labels([-1, 0, 1]) == ["unseen", "1–9", "10–99"]
    assert bin_labels(np.array([4, 2])) == ["10,000–99,999", "100–999"]
    with pytest.raises(ValueError):
        bin_label(-2)


def test_bin_range_round_trips_through_freq_bin():
    assert bin_range(-1) == (0, 0)
    assert bin_range(0) == (1, 9)
    assert bin_range(1) == (10, 99)
    assert bin_range(3) == (1000, 9999)
    for b in range(-1, 9):
        lo, hi = bin_range(b)
        np.testing.assert_array_equal(freq_bin(np.array([lo, hi])), [b, b])
        if b >= 0:  # neighbours just outside the range fall in the adjacent bins
            np.testing.assert_array_equal(freq_bin(np.array([lo - 1, hi + 1])), [b - 1, b + 1])
