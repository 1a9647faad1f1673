"""Frequency bins (SPEC §3), defined once and used by precompute, SQL, charts and CSV.

`freq_bin = floor(log10(freq))` for freq >= 1 (bin b holds [10^b, 10^(b+1))) and -1
(`unseen`) for freq = 0.
"""

from __future__ import annotations

import numpy as np

UNSEEN_BIN = -1


def freq_bin(freq: np.ndarray) -> np.ndarray:
    """Bin of each frequency (int16, same shape): floor(log10(freq)), -1 for freq 0."""
    freq = np.asarray(freq)
    if np.any(freq < 0):
        raise ValueError("frequencies must be >= 0")
    out = np.full(freq.shape, UNSEEN_BIN, dtype=np.int16)
    seen = freq >= 1
    # Integer digit count avoids float log10 edge cases at exact powers of ten (e.g. 1000).
    out[seen] = np.char.str_len(freq[seen].astype(np.int64).astype(str)) - 1
    return out


def bin_label(b: int) -> str:
    """Chart / CSV label of a bin: 'unseen', '1–9', '10–99', '1,000–9,999', ..."""
    if b == UNSEEN_BIN:
        return "unseen"
    if b < 0:
        raise ValueError(f"not a frequency bin: {b}")
    return f"{10**b:,}–{10 ** (b + 1) - 1:,}"


def bin_labels(bins: list[int] | np.ndarray) -> list[str]:
    """Labels of several bins, in the given order."""
    return [bin_label(int(b)) for b in bins]


def bin_range(b: int) -> tuple[int, int]:
    """Inclusive [low, high] frequencies of bin b (unseen = (0, 0))."""
    if b == UNSEEN_BIN:
        return (0, 0)
    return (10**b, 10 ** (b + 1) - 1)
