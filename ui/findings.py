"""The paper's qualitative findings (SPEC §6) checked against one run (pure: no streamlit).

Input: the per-bin table of `queries.bin_summary` and three correlations
(`corr_pq_error_gain`, `corr_context_freq`, `corr_freq_pq_error`). Output: one `Finding`
per claim with a verdict (True / False / None = not evaluable), the numbers behind it,
and a plain sentence where the run disagrees with the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from knnlm_core.bins import bin_label

RARE_BIN_MAX = 2  # rare = freq < 10^3 (bins 1–9, 10–99, 100–999), as in the paper's crossover


@dataclass(frozen=True)
class Finding:
    """One claim of Nishida et al. 2025 and what this run says about it."""

    claim: str  # the paper's statement
    ok: bool | None  # True: the run agrees; False: it disagrees; None: not evaluable here
    numbers: str  # the values behind the verdict
    note: str = ""  # plain sentence when the run disagrees or cannot be checked


def _bins(df: pd.DataFrame, lo: int, hi: int) -> pd.DataFrame:
    """Rows of seen bins lo..hi (inclusive)."""
    return df[(df["freq_bin"] >= lo) & (df["freq_bin"] <= hi)]


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _corr_text(c: dict) -> str:
    return f"r = {c['r']:.3f} (n = {c['n']:,}, p = {c['p']:.2g})"


def helps_high_hurts_low(df: pd.DataFrame) -> Finding:
    """kNN-LM lowers PPL in the highest bin and raises it in the lowest seen bin."""
    claim = "kNN-LM helps high-frequency bins and hurts low-frequency ones (crossover ≈ 10^3 on GPT2-XL)"
    seen = df[df["freq_bin"] >= 0]
    if len(seen) < 2:
        return Finding(claim, None, "fewer than two seen bins", "Not evaluable: the run has too few frequency bins.")
    delta = seen["ppl_knnlm"] / seen["ppl_lm"]
    low, high = seen.iloc[0], seen.iloc[-1]
    numbers = "; ".join(f"{r.bin}: {r.ppl_lm:.1f} → {r.ppl_knnlm:.1f}" for r in seen.itertuples())
    ok = bool(delta.iloc[-1] < 1.0 and delta.iloc[0] > 1.0)
    note = ""
    if not ok:
        helped = ", ".join(seen.loc[delta < 1.0, "bin"]) or "no bin"
        note = (
            f"On this run kNN-LM lowers perplexity in {helped}; the paper has it raising perplexity in the rare "
            f"bins ({low.bin}: ×{delta.iloc[0]:.2f}) while lowering it in the frequent ones ({high.bin}: ×{delta.iloc[-1]:.2f})."
        )
    return Finding(claim, ok, numbers, note)


def pknn_below_plm_low(df: pd.DataFrame) -> Finding:
    """Mean p_kNN < mean p_LM in every seen bin below 10^3."""
    claim = "p_kNN < p_LM for low-frequency targets (freq < 10^3)"
    low = _bins(df, 0, 2)
    if low.empty:
        return Finding(claim, None, "no bin below 10^3", "Not evaluable: no evaluation target has freq < 1,000.")
    numbers = "; ".join(f"{r.bin}: p_kNN {r.mean_p_knn:.4f} vs p_LM {r.mean_p_lm:.4f}" for r in low.itertuples())
    bad = low[low["mean_p_knn"] >= low["mean_p_lm"]]
    ok = bad.empty
    note = "" if ok else f"In {', '.join(bad['bin'])} the mean p_kNN is not below the mean p_LM, unlike the paper."
    return Finding(claim, ok, numbers, note)


def hit_below_half(df: pd.DataFrame, k: int, hi_bin: int, run_k: int) -> Finding:
    """hit@k < 50% in every seen bin up to hi_bin; not measured when the run has no hit@k (k > run k).

    A smaller cut-off never stands in for k: hit@64 < 50% says nothing about hit@1024.
    """
    claim = f"hit@{k} < 50% for freq < {10 ** (hi_bin + 1):,}"
    col = f"hit_{k}"
    if col not in df.columns or not df[col].notna().any():
        return Finding(claim, None, f"hit@{k} not measured",
                       f"Not measured: the run retrieved k = {run_k} neighbours, fewer than {k}.")
    sub = _bins(df, 0, hi_bin)
    if sub.empty:
        return Finding(claim, None, "no such bin", f"Not evaluable: no target with freq < {10 ** (hi_bin + 1):,}.")
    numbers = "; ".join(f"{r.bin}: {_pct(getattr(r, col))}" for r in sub.itertuples())
    bad = sub[sub[col] >= 0.5]
    ok = bad.empty
    note = "" if ok else f"The target is among the first {k} neighbours at least half of the time in {', '.join(bad['bin'])}."
    return Finding(claim, ok, numbers, note)


def _harmed_rare_bins(claim: str, exact: pd.DataFrame | None) -> pd.DataFrame | Finding:
    """The rare bins whose PPL the index's kNN-LM raises, or the Finding saying why there are none."""
    if exact is None or exact.empty:
        return Finding(claim, None, "no exact search", "Not measured: the run has no exact-search comparison.")
    rare = _bins(exact, 0, RARE_BIN_MAX)
    harmed = rare[rare["ppl_ivf_pq"] > rare["ppl_lm"]]
    if harmed.empty:
        return Finding(claim, None, "no harmed rare bin", "Not evaluable: kNN-LM harms no rare bin on this run.")
    return harmed


def quantization_explains_rare_harm(exact: pd.DataFrame | None) -> Finding:
    """In the rare bins that kNN-LM harms (IVFPQ), exact search lowers the kNN-LM perplexity (SPEC §8)."""
    claim = "approximate (PQ) search adds to the rare-bin harm: exact search lowers kNN-LM PPL there"
    harmed = _harmed_rare_bins(claim, exact)
    if isinstance(harmed, Finding):
        return harmed
    numbers = "; ".join(
        f"{r.bin}: {r.ppl_ivf_pq:.1f} (IVFPQ) → {r.ppl_exact:.1f} (exact), explains {_pct(r.share_explained_by_quantization)}"
        for r in harmed.itertuples())
    worse = harmed[harmed["ppl_exact"] >= harmed["ppl_ivf_pq"]]
    ok = worse.empty
    note = "" if ok else (f"In {', '.join(worse['bin'])} exact search does not lower kNN-LM's perplexity: the rare-bin "
                          "harm is not caused by quantization here.")
    return Finding(claim, ok, numbers, note)


def crisis_survives_exact(exact: pd.DataFrame | None) -> Finding:
    """With exact search, kNN-LM still raises PPL in the rare bins (quantization is not the whole cause)."""
    claim = "the rare-bin harm survives exact search (PQ is not the whole cause)"
    harmed = _harmed_rare_bins(claim, exact)
    if isinstance(harmed, Finding):
        return harmed
    numbers = "; ".join(f"{r.bin}: LM {r.ppl_lm:.1f}, exact kNN-LM {r.ppl_exact:.1f}" for r in harmed.itertuples())
    cured = harmed[harmed["ppl_exact"] <= harmed["ppl_lm"]]
    ok = cured.empty
    note = "" if ok else f"With exact search kNN-LM no longer harms {', '.join(cured['bin'])}: there PQ is the cause."
    return Finding(claim, ok, numbers, note)


def contamination_high_rare(df: pd.DataFrame) -> Finding:
    """Mean contamination of bin 0 types > 50%."""
    claim = "contamination > 50% for types with freq < 10"
    row = df[df["freq_bin"] == 0]
    if row.empty or pd.isna(row["mean_contamination"].iloc[0]):
        return Finding(claim, None, "bin 1–9 absent", "Not evaluable: no evaluated type with freq < 10.")
    c = float(row["mean_contamination"].iloc[0])
    ok = c > 0.5
    note = "" if ok else f"Rare types' neighbourhoods are cleaner here ({_pct(c)} foreign values) than in the paper."
    return Finding(claim, ok, f"{bin_label(0)}: mean contamination {_pct(c)}", note)


def pq_error_rarer(corr: dict) -> Finding:
    """Negative correlation between log10 freq and pq_error_mean over types."""
    claim = "PQ reconstruction error is larger for rarer types"
    if corr["n"] < 3 or math.isnan(corr["r"]):
        return Finding(claim, None, f"n = {corr['n']}", "Not evaluable: too few types with a PQ error.")
    ok = corr["r"] < 0
    note = "" if ok else "Here frequent types have the larger PQ error, the opposite of the paper."
    return Finding(claim, ok, "log10 freq vs pq_error_mean over types: " + _corr_text(corr), note)


def pq_error_gain(corr: dict) -> Finding:
    """Negative Pearson r between the target type's pq_error_mean and gain (paper ≈ -0.20)."""
    claim = "larger PQ error of the target type ↔ smaller gain (paper r ≈ -0.20)"
    if corr["n"] < 3 or math.isnan(corr["r"]):
        return Finding(claim, None, f"n = {corr['n']}", "Not evaluable: too few tokens.")
    ok = corr["r"] < 0
    note = "" if ok else f"The correlation is {corr['r']:+.3f}: on this run PQ error does not go with lower gain."
    return Finding(claim, ok, _corr_text(corr), note)


def context_freq_corr(corr: dict) -> Finding:
    """Weak negative Pearson r between log10 context_freq and log10 freq (paper -0.12 … -0.02)."""
    claim = "log10 context freq vs log10 target freq: weak negative (paper r = -0.12 … -0.02)"
    if corr["n"] < 3 or math.isnan(corr["r"]):
        return Finding(claim, None, f"n = {corr['n']}", "Not evaluable: too few tokens.")
    r = corr["r"]
    ok = r < 0
    note = ""
    if not ok:
        note = f"The correlation is {r:+.3f}, not negative as in the paper."
    elif not -0.12 <= r <= -0.02:
        note = f"Negative as in the paper, but outside its range (-0.12 … -0.02): {r:+.3f}."
    return Finding(claim, ok, _corr_text(corr), note)


def crisis_by_bin(df: pd.DataFrame) -> pd.DataFrame:
    """Per bin of a bin_summary: PPL change of kNN-LM vs the LM and whether kNN-LM harms the bin."""
    out = df[["freq_bin", "bin", "n_tokens", "ppl_lm", "ppl_knnlm"]].copy()
    out["delta_ppl"] = out["ppl_knnlm"] - out["ppl_lm"]
    out["kNN-LM"] = ["harms" if d > 0 else "helps" if d < 0 else "no change" for d in out["delta_ppl"]]
    return out


def crisis_holds(df: pd.DataFrame) -> tuple[bool | None, str]:
    """(verdict, sentence): does kNN-LM raise PPL in every seen rare bin (freq < 10^3) of this run?"""
    rare = _bins(df, 0, RARE_BIN_MAX)
    if rare.empty:
        return None, "no evaluation target has 1 ≤ freq < 1,000: not evaluable"
    harmed = rare[rare["ppl_knnlm"] > rare["ppl_lm"]]
    names = ", ".join(harmed["bin"]) or "none"
    if len(harmed) == len(rare):
        return True, f"holds: kNN-LM raises perplexity in every rare bin ({names})"
    return False, f"does not hold in full: kNN-LM raises perplexity in {names} of the {len(rare)} rare bins"


def evaluate(df: pd.DataFrame, run_k: int, corr_gain: dict, corr_ctx: dict, corr_freq_pq: dict,
             exact: pd.DataFrame | None = None) -> list[Finding]:
    """Every SPEC §6 finding in the order of the paper's narrative, then the SPEC §8 exact-search rows
    (`exact`: the run's `queries.exact_bin_summary`, None when it has no exact search)."""
    return [
        helps_high_hurts_low(df),
        pknn_below_plm_low(df),
        hit_below_half(df, 1024, 0, run_k),
        hit_below_half(df, 16, 3, run_k),
        contamination_high_rare(df),
        pq_error_rarer(corr_freq_pq),
        pq_error_gain(corr_gain),
        context_freq_corr(corr_ctx),
        quantization_explains_rare_harm(exact),
        crisis_survives_exact(exact),
    ]


def to_frame(findings: list[Finding]) -> pd.DataFrame:
    """Findings as a table with a ✓ / ✗ / – verdict column (for display and CSV)."""
    mark = {True: "✓", False: "✗", None: "–"}
    return pd.DataFrame(
        {
            "verdict": [mark[f.ok] for f in findings],
            "claim": [f.claim for f in findings],
            "this run": [f.numbers for f in findings],
            "note": [f.note for f in findings],
        }
    )
