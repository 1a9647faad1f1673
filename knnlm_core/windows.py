"""Sliding-window scoring plan (SPEC §1, "Corpus windows").

A corpus of n tokens is scored with windows of at most `max_context` tokens that advance
by `stride`. Inside a window, the hidden state at position j predicts token j + 1. Every
target index 1..n-1 is scored exactly once, by the first window that reaches it, so it gets
the longest context that window offers. Position t's key (the hidden state at t) therefore
predicts token t + 1: the datastore entry / evaluation position `pos = t`. Every window but
the last has `max_context` tokens, so consecutive windows batch without padding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; keys at positions [first_pos, end - 1) are kept."""

    begin: int
    end: int
    first_pos: int  # first global position whose key/prediction this window owns

    @property
    def n_owned(self) -> int:
        """Number of positions (= targets) this window scores."""
        return self.end - 1 - self.first_pos


def plan_windows(n_tokens: int, max_context: int, stride: int) -> list[Window]:
    """Windows covering positions 0..n_tokens-2 exactly once (position t predicts token t+1)."""
    if max_context < 2:
        raise ValueError(f"max_context must be >= 2, got {max_context}")
    if not 1 <= stride <= max_context:
        raise ValueError(f"stride must be in 1..max_context ({max_context}), got {stride}")
    windows: list[Window] = []
    next_pos = 0  # first position not yet owned by any window
    begin = 0
    while next_pos < n_tokens - 1:
        end = min(begin + max_context, n_tokens)
        windows.append(Window(begin=begin, end=end, first_pos=next_pos))
        next_pos = end - 1
        begin = min(begin + stride, next_pos)  # stride == max_context: keep position next_pos inside
    return windows
