"""Document-level (block) bootstrap of per-bin figures (SPEC §11).

Evaluation tokens of one document share a context, so they are not independent: intervals
resample whole documents. Everything a per-bin figure needs is a sum over tokens, so the
input is a long table of per (document, group) sums (`doc_id, <group>, n_tokens, sum_*`,
e.g. the `doc_bin_stats` view) and a resample is a vector of document counts: the
resampled sums of every group are one matrix product (B × D) @ (D × G). Differences of two
settings on the same tokens are *paired* (the same documents drawn for both sides);
two runs on different text are resampled independently (`two_run_change`).

The draws are `numpy.random.default_rng(seed).integers(0, n_docs, (n_boot, n_docs))`:
row b lists the documents of resample b, so a plain loop can reproduce any interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

N_BOOT = 1000  # resamples (SPEC §11: B >= 1,000)
SEED = 0  # one seed everywhere: every page of a run draws the same documents
LEVEL = 0.95  # percentile interval
MIN_TOKENS = 30  # a group with fewer tokens gets no interval
MIN_DOCS = 5  # ... or with tokens from fewer documents
KINDS = ("ppl", "mean", "ppl_change", "mean_diff")


@dataclass(frozen=True)
class Figure:
    """One per-group figure over token sums.

    kind "ppl": exp(sum(col) / n); "mean": sum(col) / n; "ppl_change": exp((sum(a) − sum(b)) / n) − 1,
    the relative PPL change of setting a vs b on the same tokens; "mean_diff": (sum(a) − sum(b)) / n.
    `cols` names the sum columns: one for ppl / mean, (a, b) for the paired kinds.
    """

    name: str
    kind: str
    cols: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"figure {self.name}: kind {self.kind!r} is not one of {KINDS}")
        want = 2 if self.kind in ("ppl_change", "mean_diff") else 1
        if len(self.cols) != want:
            raise ValueError(f"figure {self.name}: kind {self.kind} takes {want} column(s), got {self.cols}")


def ppl(name: str, col: str) -> Figure:
    return Figure(name, "ppl", (col,))


def mean(name: str, col: str) -> Figure:
    return Figure(name, "mean", (col,))


def ppl_change(name: str, col_a: str, col_b: str) -> Figure:
    return Figure(name, "ppl_change", (col_a, col_b))


def mean_diff(name: str, col_a: str, col_b: str) -> Figure:
    return Figure(name, "mean_diff", (col_a, col_b))


def draw_documents(n_docs: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n_docs) int64: row b = the documents (with repetition) of resample b ((n_boot, 0) for no documents)."""
    if n_docs <= 0:
        return np.zeros((n_boot, 0), np.int64)
    return np.random.default_rng(seed).integers(0, n_docs, size=(n_boot, n_docs))


def doc_counts(draws: np.ndarray, n_docs: int) -> np.ndarray:
    """(B, D) float64: how often each document is drawn in each resample."""
    b = draws.shape[0]
    flat = (np.arange(b)[:, None] * n_docs + draws).ravel()
    return np.bincount(flat, minlength=b * n_docs).reshape(b, n_docs).astype(np.float64)


def figure_value(fig: Figure, n: np.ndarray, sums: dict[str, np.ndarray]) -> np.ndarray:
    """The figure from token counts `n` and the sums (any equal shapes; NaN where n = 0)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        means = [np.where(n > 0, sums[c] / np.where(n > 0, n, 1), np.nan) for c in fig.cols]
        if fig.kind == "ppl":
            return np.exp(means[0])
        if fig.kind == "mean":
            return means[0]
        if fig.kind == "ppl_change":
            return np.expm1(means[0] - means[1])
        return means[0] - means[1]


def pivot(frame: pd.DataFrame, cols: list[str], n_docs: int, group: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(groups (G,), {col: (D, G) float64}) from a long (doc_id, group, cols...) frame; absent cells are 0."""
    groups = np.sort(frame[group].unique())
    doc = frame["doc_id"].to_numpy(np.int64)
    if len(doc) and (doc.min() < 0 or doc.max() >= n_docs):
        raise ValueError(f"doc_id outside 0..{n_docs - 1}: the per-document table does not match the run")
    g = np.searchsorted(groups, frame[group].to_numpy())
    out = {}
    for c in cols:
        m = np.zeros((n_docs, len(groups)))
        np.add.at(m, (doc, g), frame[c].to_numpy(np.float64))
        out[c] = m
    return groups, out


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) percentile interval over axis 0, ignoring NaN resamples (a group absent from a resample)."""
    tail = 100 * (1 - level) / 2
    if samples.ndim != 2 or samples.shape[0] == 0 or samples.shape[1] == 0:  # no group or no resample: no interval
        width = samples.shape[1] if samples.ndim == 2 else 0
        return np.full(width, np.nan), np.full(width, np.nan)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(samples).any(axis=0)
        safe = np.where(finite[None, :], samples, 0.0)
        lo, hi = np.nanpercentile(np.where(np.isfinite(safe), safe, np.nan), [tail, 100 - tail], axis=0)
    return np.where(finite, lo, np.nan), np.where(finite, hi, np.nan)


def intervals(frame: pd.DataFrame, figures: list[Figure], n_docs: int, group: str = "freq_bin",
              n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> pd.DataFrame:
    """Per group: n_tokens, n_docs, each figure's value and `<name>_ci_lo` / `<name>_ci_hi`.

    `frame`: per (doc_id, group) `n_tokens` and the sum columns the figures name; `n_docs`: the
    number of documents of the evaluation (the resampling units, ids 0..n_docs−1, including those
    without a token in the frame). Groups under MIN_TOKENS tokens or MIN_DOCS documents get NaN
    bounds and a `ci_note`.
    """
    cols = sorted({c for f in figures for c in f.cols} | {"n_tokens"})
    groups, sums = pivot(frame, cols, n_docs, group)
    n = sums.pop("n_tokens")
    counts = doc_counts(draw_documents(n_docs, n_boot, seed), n_docs)  # (B, D)
    boot_n = counts @ n  # (B, G)
    with np.errstate(invalid="ignore"):  # an infinite NLL (p = 0) times a zero count: that resample is NaN
        boot = {c: counts @ s for c, s in sums.items()}
    out = pd.DataFrame({group: groups, "n_tokens": n.sum(axis=0).astype(np.int64),
                        "n_docs": (n > 0).sum(axis=0).astype(np.int64)})
    small = (out["n_tokens"] < MIN_TOKENS) | (out["n_docs"] < MIN_DOCS)
    for f in figures:
        out[f.name] = figure_value(f, n.sum(axis=0), {c: s.sum(axis=0) for c, s in sums.items()})
        lo, hi = percentile_interval(figure_value(f, boot_n, boot), level)
        out[f"{f.name}_ci_lo"] = np.where(small, np.nan, lo)
        out[f"{f.name}_ci_hi"] = np.where(small, np.nan, hi)
    out["ci_note"] = np.where(out["n_tokens"] < MIN_TOKENS, f"no interval: < {MIN_TOKENS} tokens",
                              np.where(out["n_docs"] < MIN_DOCS, f"no interval: < {MIN_DOCS} documents", ""))
    return out


def two_run_change(frame_a: pd.DataFrame, n_docs_a: int, frame_b: pd.DataFrame, n_docs_b: int, fig_a: Figure,
                   fig_b: Figure, name: str, paired: bool, group: str = "freq_bin", n_boot: int = N_BOOT,
                   seed: int = SEED, level: float = LEVEL) -> pd.DataFrame:
    """Per group shared by both: relative change fig_a / fig_b − 1 (both "ppl") or difference fig_a − fig_b
    (both "mean") of two runs. `paired` (the same evaluation documents in both runs): the same documents are
    drawn for both sides; otherwise (different text) each side is resampled independently (seeds seed, seed + 1)."""
    if fig_a.kind != fig_b.kind or fig_a.kind not in ("ppl", "mean"):
        raise ValueError("two_run_change compares two 'ppl' or two 'mean' figures")
    if paired and n_docs_a != n_docs_b:
        raise ValueError(f"paired resampling needs the same documents ({n_docs_a} vs {n_docs_b})")
    sides = []
    for frame, n_docs, fig, s in ((frame_a, n_docs_a, fig_a, seed), (frame_b, n_docs_b, fig_b,
                                                                       seed if paired else seed + 1)):
        groups, sums = pivot(frame, ["n_tokens", *fig.cols], n_docs, group)
        n = sums.pop("n_tokens")
        counts = doc_counts(draw_documents(n_docs, n_boot, s), n_docs)
        point = figure_value(fig, n.sum(axis=0), {c: v.sum(axis=0) for c, v in sums.items()})
        boot = figure_value(fig, counts @ n, {c: counts @ v for c, v in sums.items()})
        small = (n.sum(axis=0) < MIN_TOKENS) | ((n > 0).sum(axis=0) < MIN_DOCS)
        sides.append(pd.DataFrame({group: groups, "point": point, "small": small, "col": range(len(groups))})
                     .assign(boot=list(boot.T)))
    m = sides[0].merge(sides[1], on=group, suffixes=("_a", "_b"))
    ratio = fig_a.kind == "ppl"
    diff = np.stack([a / b - 1 if ratio else a - b for a, b in zip(m["boot_a"], m["boot_b"], strict=True)], axis=1) \
        if len(m) else np.zeros((n_boot, 0))
    lo, hi = percentile_interval(diff, level)
    small = (m["small_a"] | m["small_b"]).to_numpy()
    return pd.DataFrame({group: m[group], name: m["point_a"] / m["point_b"] - 1 if ratio else m["point_a"] - m["point_b"],
                         f"{name}_ci_lo": np.where(small, np.nan, lo), f"{name}_ci_hi": np.where(small, np.nan, hi)})


def verdict(lo: float, hi: float, lower: str = "helps", higher: str = "harms") -> str:
    """SPEC §11: `lower` when the interval of a difference lies below 0, `higher` above, else no significant
    difference; 'no interval' when there is none (too few tokens or documents)."""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return "no interval"
    if hi < 0:
        return lower
    if lo > 0:
        return higher
    return "no significant difference"


def ci_text(value: float, lo: float, hi: float, fmt: str = "{:.1f}") -> str:
    """'v [lo, hi]' (or 'v [no interval]') for sentences and table cells."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt.format(value) + " [no interval]"
    return f"{fmt.format(value)} [{fmt.format(lo)}, {fmt.format(hi)}]"
