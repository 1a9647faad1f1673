"""Tests of knnlm_core.windows (SPEC §1 corpus windows): every position scored once, longest context."""

from __future__ import annotations

import itertools

import pytest

from knnlm_core.windows import Window, plan_windows


def owners(n_tokens: int, windows: list[Window]) -> dict[int, list[Window]]:
    """Position -> the windows that claim it (positions [first_pos, end - 1))."""
    out: dict[int, list[Window]] = {}
    for w in windows:
        for pos in range(w.first_pos, w.end - 1):
            out.setdefault(pos, []).append(w)
    return out


def check_plan(n_tokens: int, max_context: int, stride: int) -> list[Window]:
    """Assert every invariant of the plan against a brute-force walk; return the windows."""
    windows = plan_windows(n_tokens, max_context, stride)
    own = owners(n_tokens, windows)
    assert sorted(own) == list(range(n_tokens - 1))  # positions 0..n-2, nothing else
    assert all(len(ws) == 1 for ws in own.values())  # each exactly once
    for w in windows:
        assert 0 <= w.begin <= w.first_pos < w.end - 1 < w.end <= n_tokens  # owned positions lie inside
        assert w.end - w.begin <= max_context
        assert w.n_owned == w.end - 1 - w.first_pos >= 1
    assert [w.first_pos for w in windows] == sorted(w.first_pos for w in windows)
    assert all(w.end - w.begin == max_context for w in windows[:-1])  # only the last is shorter: one batch grid
    for pos, (w,) in own.items():
        context = pos - w.begin + 1  # tokens begin..pos seen when predicting pos + 1
        assert context >= min(pos + 1, max_context - stride)
        assert context >= 1
        # no planned window that sees both pos and its target pos + 1 gives a longer context
        best = max(pos - v.begin + 1 for v in windows if v.begin <= pos and pos + 1 < v.end)
        assert context == best
    return windows


@pytest.mark.parametrize(
    ("n_tokens", "max_context", "stride"),
    list(itertools.product([2, 3, 5, 17, 64, 65, 100], [2, 3, 4, 8, 16], [1, 2, 3, 4, 8, 16])),
)
def test_plan_grid(n_tokens, max_context, stride):
    if stride > max_context:
        with pytest.raises(ValueError):
            plan_windows(n_tokens, max_context, stride)
        return
    check_plan(n_tokens, max_context, stride)


def test_hand_plan():
    # 10 tokens, windows of 4 advancing by 2: positions 0-2 | 3 | 5 ... each owned once
    assert plan_windows(10, 4, 2) == [
        Window(0, 4, 0),
        Window(2, 6, 3),
        Window(4, 8, 5),
        Window(6, 10, 7),
    ]


def test_two_tokens():
    assert plan_windows(2, 1024, 512) == [Window(0, 2, 0)]
    assert plan_windows(2, 1024, 512)[0].n_owned == 1


def test_fewer_tokens_than_context_is_one_window():
    windows = check_plan(300, 1024, 512)
    assert windows == [Window(0, 300, 0)]
    assert windows[0].n_owned == 299


def test_exact_fit_is_one_window():
    assert plan_windows(16, 16, 8) == [Window(0, 16, 0)]


def test_stride_equal_to_max_context():
    windows = check_plan(10, 4, 4)
    # each later window starts at the first position it owns (a 1-token overlap), never after it
    assert all(w.begin <= w.first_pos for w in windows)
    assert sum(w.n_owned for w in windows) == 9


def test_stride_one_gives_full_context():
    windows = check_plan(20, 5, 1)
    for pos, (w,) in owners(20, windows).items():
        assert pos - w.begin + 1 == min(pos + 1, 4)  # max_context - stride


def test_default_stride_half_context():
    windows = check_plan(5000, 1024, 512)
    assert [w.begin for w in windows] == list(range(0, 512 * len(windows), 512))
    assert all(w.n_owned == 512 for w in windows[1:-1])


@pytest.mark.parametrize(("n_tokens",), [(0,), (1,)])
def test_nothing_to_score(n_tokens):
    assert plan_windows(n_tokens, 8, 4) == []


@pytest.mark.parametrize(
    ("max_context", "stride"),
    [(1, 1), (0, 1), (8, 0), (8, -1), (8, 9)],
)
def test_invalid_arguments(max_context, stride):
    with pytest.raises(ValueError):
        plan_windows(100, max_context, stride)
