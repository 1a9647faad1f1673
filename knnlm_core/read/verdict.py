"""What a findings row is (SPEC §6, §11): the `Finding` record and the helpers that turn a table's interval
columns into a verdict and its words; the rules themselves live with their feature (bins in findings.py, exact
search in exact.py, context novelty in novelty.py). Pure pandas: no streamlit."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

RARE_BIN_MAX = 2  # rare = freq < 10^3 (bins 1–9, 10–99, 100–999), as in the paper's crossover
NS_RULE = "≈ when an interval includes 0; – when a bin has no interval (fewer than 30 tokens or 5 documents)"


@dataclass(frozen=True)
class Finding:
    """One claim of Nishida et al. 2025 and what this run says about it."""

    claim: str  # the paper's statement
    ok: bool | None  # True: the run agrees; False: it disagrees; None: not evaluable here
    numbers: str  # the values behind the verdict
    note: str = ""  # plain sentence when the run disagrees or cannot be checked
    ns: bool = False  # ok is None because the intervals show no significant difference (SPEC §11)
    rule: str = ""  # how the verdict is decided, in words (the table shows it beside the claim)


def ci_text(row, col: str, fmt: str = "{:+.1%}") -> str:
    """' [lo, hi]' of a row's interval columns, or ' [no interval]'."""
    lo, hi = getattr(row, f"{col}_ci_lo", float("nan")), getattr(row, f"{col}_ci_hi", float("nan"))
    if pd.isna(lo) or pd.isna(hi):
        return " [no interval]"
    return f" [{fmt.format(lo)}, {fmt.format(hi)}]"


def ci_sign(row, col: str) -> int | None:
    """+1 / −1 when the interval of `col` (a difference) lies above / below 0, 0 when it includes 0,
    None when the bin has no interval (too few tokens or documents)."""
    lo, hi = getattr(row, f"{col}_ci_lo", float("nan")), getattr(row, f"{col}_ci_hi", float("nan"))
    if pd.isna(lo) or pd.isna(hi):
        return None
    return 1 if lo > 0 else -1 if hi < 0 else 0


def undecided(bins: list[str], signs: list[int | None]) -> str:
    """Why a claim is undecided: the bins without a significant difference and those without an interval."""
    parts = []
    ns = [b for b, s in zip(bins, signs, strict=True) if s == 0]
    none = [b for b, s in zip(bins, signs, strict=True) if s is None]
    if ns:
        parts.append(f"No significant difference in {', '.join(ns)}: the 95% interval includes 0.")
    if none:
        parts.append(f"No interval in {', '.join(none)} (fewer than 30 tokens or 5 documents).")
    return " ".join(parts)


def is_ns(ok: bool | None, signs: list[int | None]) -> bool:
    """Undecided because of the data (every bin has an interval, some include 0), not for lack of one."""
    return ok is None and all(s is not None for s in signs)


def decide(signs: list[int], want: list[int]) -> bool | None:
    """True when every sign is the wanted one, False when any is significantly the opposite, else None."""
    if any(s == -w for s, w in zip(signs, want, strict=True)):
        return False
    return True if all(s == w for s, w in zip(signs, want, strict=True)) else None


def bins_between(df: pd.DataFrame, lo: int, hi: int) -> pd.DataFrame:
    """Rows of seen bins lo..hi (inclusive)."""
    return df[(df["freq_bin"] >= lo) & (df["freq_bin"] <= hi)]


def pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"
