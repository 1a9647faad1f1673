"""The paper's qualitative findings (SPEC §6) checked against one run: the checklist the Overview shows.

Input: the per-bin table of `bins.bin_summary` and three correlations (`corr_pq_error_gain`, `corr_context_freq`,
`corr_freq_pq_error`), optionally the exact-search table (SPEC §8) and `novelty.novelty_findings` (SPEC §12: rare
target or novel context?). Output: one `verdict.Finding` per claim with a verdict (True / False / None = not
evaluable or, with `ns`, no significant difference), the numbers behind it, and a plain sentence where the run
disagrees with the paper. Per-bin claims are decided by the SPEC §11 intervals of the tables (`*_ci_lo`,
`*_ci_hi`): a claim holds only where the interval of the difference excludes 0; a correlation claim only where
p < ALPHA (issue 21). Every Finding states its `rule`, and its verdict follows it (tests/test_findings.py
recomputes each row on the shipped runs). The SPEC §8 and §12 rows live in exact.py and novelty.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from knnlm_core.bins import bin_label
from knnlm_core.read.exact import crisis_survives_exact, quantization_explains_rare_harm
from knnlm_core.read.novelty import gains_from_found_contexts, novel_rare_harmed
from knnlm_core.read.verdict import (
    NS_RULE,
    RARE_BIN_MAX,
    Finding,
    bins_between,
    ci_sign,
    ci_text,
    decide,
    is_ns,
    pct,
    undecided,
)

ALPHA = 0.05  # a correlation counts only with p < ALPHA (two-sided); otherwise "no significant correlation" (≈)
CORR_RULE = (f"✓ when r < 0 with p < {ALPHA}; ✗ when r > 0 with p < {ALPHA}; ≈ when p ≥ {ALPHA} (no significant "
             "correlation)")


def _corr_text(c: dict) -> str:
    return f"r = {c['r']:.3f} (n = {c['n']:,}, p = {c['p']:.2g})"


def helps_high_hurts_low(df: pd.DataFrame) -> Finding:
    """kNN-LM lowers PPL in the highest bin and raises it in the lowest seen bin (paired intervals)."""
    claim = "kNN-LM helps high-frequency bins and hurts low-frequency ones (crossover ≈ 10^3 on GPT2-XL)"
    rule = ("✓ when the 95% interval of kNN-LM's PPL change vs the LM lies above 0 in the lowest seen bin and below "
            f"0 in the highest; ✗ when either lies on the other side of 0; {NS_RULE}")
    seen = df[df["freq_bin"] >= 0]
    if len(seen) < 2:
        return Finding(claim, None, "fewer than two seen bins", "Not evaluable: the run has too few frequency bins.",
                       rule=rule)
    if "ppl_change" not in seen:
        seen = seen.assign(ppl_change=seen["ppl_knnlm"] / seen["ppl_lm"] - 1)
    low, high = seen.iloc[0], seen.iloc[-1]
    numbers = "; ".join(f"{r.bin}: {r.ppl_lm:.1f} → {r.ppl_knnlm:.1f} ({r.ppl_change:+.1%}{ci_text(r, 'ppl_change')})"
                        for r in seen.itertuples())
    has_ci = "ppl_change_ci_lo" in seen
    signs = [ci_sign(low, "ppl_change"), ci_sign(high, "ppl_change")] if has_ci else \
        [int(np.sign(low.ppl_change)), int(np.sign(high.ppl_change))]
    ok = decide(signs, [1, -1])
    note = ""
    if ok is False:
        helped = ", ".join(seen.loc[seen["ppl_change"] < 0, "bin"]) or "no bin"
        note = (
            f"On this run kNN-LM lowers perplexity in {helped}; the paper has it raising perplexity in the rare "
            f"bins ({low.bin}: {low.ppl_change:+.1%}) while lowering it in the frequent ones ({high.bin}: "
            f"{high.ppl_change:+.1%})."
        )
    elif ok is None:
        note = undecided([low.bin, high.bin], signs)
    return Finding(claim, ok, numbers, note, ns=is_ns(ok, signs), rule=rule)


def pknn_below_plm_low(df: pd.DataFrame) -> Finding:
    """Mean p_kNN < mean p_LM in every seen bin below 10^3 (paired interval of the difference)."""
    claim = "p_kNN < p_LM for low-frequency targets (freq < 10^3)"
    rule = ("✓ when the 95% interval of mean p_kNN − mean p_LM lies below 0 in every seen bin below 10^3; ✗ when it "
            f"lies above 0 in any; {NS_RULE}")
    low = bins_between(df, 0, 2)
    if low.empty:
        return Finding(claim, None, "no bin below 10^3", "Not evaluable: no evaluation target has freq < 1,000.",
                       rule=rule)
    if "p_knn_minus_p_lm" not in low:
        low = low.assign(p_knn_minus_p_lm=low["mean_p_knn"] - low["mean_p_lm"])
    numbers = "; ".join(f"{r.bin}: p_kNN {r.mean_p_knn:.4f} vs p_LM {r.mean_p_lm:.4f} "
                        f"(Δ {r.p_knn_minus_p_lm:+.4f}{ci_text(r, 'p_knn_minus_p_lm', '{:+.4f}')})" for r in low.itertuples())
    has_ci = "p_knn_minus_p_lm_ci_lo" in low
    signs = [ci_sign(r, "p_knn_minus_p_lm") if has_ci else int(np.sign(r.p_knn_minus_p_lm)) for r in low.itertuples()]
    ok = decide(signs, [-1] * len(signs))
    bad = [r.bin for r, s in zip(low.itertuples(), signs) if s == 1]
    note = "" if ok else (f"In {', '.join(bad)} the mean p_kNN is above the mean p_LM, unlike the paper." if bad else
                          undecided(list(low["bin"]), signs))
    return Finding(claim, ok, numbers, note, ns=is_ns(ok, signs), rule=rule)


def hit_below_half(df: pd.DataFrame, k: int, hi_bin: int, run_k: int) -> Finding:
    """hit@k < 50% in every seen bin up to hi_bin (interval below 0.5); not measured when the run has no
    hit@k (k > run k). A smaller cut-off never stands in for k: hit@64 < 50% says nothing about hit@1024."""
    claim = f"hit@{k} < 50% for freq < {10 ** (hi_bin + 1):,}"
    rule = (f"✓ when the 95% interval of hit@{k} lies below 50% in every seen bin with freq < {10 ** (hi_bin + 1):,} "
            "(the value itself where a bin has no interval); ✗ when it lies at or above 50% in any; ≈ otherwise")
    col = f"hit_{k}"
    if col not in df.columns or not df[col].notna().any():
        return Finding(claim, None, f"hit@{k} not measured",
                       f"Not measured: the run retrieved k = {run_k} neighbours, fewer than {k}.", rule=rule)
    sub = bins_between(df, 0, hi_bin)
    if sub.empty:
        return Finding(claim, None, "no such bin", f"Not evaluable: no target with freq < {10 ** (hi_bin + 1):,}.",
                       rule=rule)
    numbers = "; ".join(f"{r.bin}: {pct(getattr(r, col))}{ci_text(r, col, '{:.1%}')}" for r in sub.itertuples())
    # Without interval columns (or a bin without an interval) the point value decides, as before SPEC §11.
    lo = sub.get(f"{col}_ci_lo", sub[col]).fillna(sub[col])
    hi = sub.get(f"{col}_ci_hi", sub[col]).fillna(sub[col])
    signs = [(-1 if h < 0.5 else 1 if low_ >= 0.5 else 0) for low_, h in zip(lo, hi, strict=True)]
    ok = decide(signs, [-1] * len(signs))
    bad = [b for b, s in zip(sub["bin"], signs) if s == 1]
    note = "" if ok else (f"The target is among the first {k} neighbours at least half of the time in {', '.join(bad)}."
                          if bad else "The 95% interval of hit@k includes 50% in "
                          f"{', '.join(b for b, s in zip(sub['bin'], signs) if s == 0)}: no significant difference.")
    return Finding(claim, ok, numbers, note, ns=ok is None, rule=rule)


def contamination_high_rare(df: pd.DataFrame) -> Finding:
    """Mean contamination of bin 0 types > 50%."""
    claim = "contamination > 50% for types with freq < 10"
    rule = "✓ when the mean contamination of the datastore types with freq 1–9 is above 50% (a per-type mean, " \
           "no interval); ✗ otherwise"
    row = df[df["freq_bin"] == 0]
    if row.empty or pd.isna(row["mean_contamination"].iloc[0]):
        return Finding(claim, None, "bin 1–9 absent", "Not evaluable: no evaluated type with freq < 10.", rule=rule)
    c = float(row["mean_contamination"].iloc[0])
    ok = c > 0.5
    note = "" if ok else f"Rare types' neighbourhoods are cleaner here ({pct(c)} foreign values) than in the paper."
    return Finding(claim, ok, f"{bin_label(0)}: mean contamination {pct(c)}", note, rule=rule)


def _corr_sign(corr: dict) -> int:
    """−1 / +1 for a correlation significant at ALPHA (its sign), 0 when p ≥ ALPHA."""
    return int(np.sign(corr["r"])) if corr["p"] < ALPHA else 0


def _corr_finding(claim: str, corr: dict, numbers: str, wrong: str, what: str) -> Finding:
    """A negative-correlation claim decided by CORR_RULE (sign and p-value); `wrong`: the note when r > 0."""
    if corr["n"] < 3 or math.isnan(corr["r"]) or math.isnan(corr["p"]):
        return Finding(claim, None, f"n = {corr['n']}", f"Not evaluable: too few {what}.", rule=CORR_RULE)
    sign = _corr_sign(corr)
    ok = None if sign == 0 else sign < 0
    note = "" if ok else wrong if ok is False else \
        f"No significant correlation: p = {corr['p']:.2g} ≥ {ALPHA} (r = {corr['r']:+.3f})."
    return Finding(claim, ok, numbers, note, ns=sign == 0, rule=CORR_RULE)


def pq_error_rarer(corr: dict) -> Finding:
    """Negative correlation between log10 freq and pq_error_mean over types (CORR_RULE)."""
    return _corr_finding("PQ reconstruction error is larger for rarer types", corr,
                         "log10 freq vs pq_error_mean over types: " + _corr_text(corr),
                         "Here frequent types have the larger PQ error, the opposite of the paper.", "types with a PQ error")


def pq_error_gain(corr: dict) -> Finding:
    """Negative Pearson r between the target type's pq_error_mean and gain (paper ≈ -0.20; CORR_RULE)."""
    return _corr_finding("larger PQ error of the target type ↔ smaller gain (paper r ≈ -0.20)", corr, _corr_text(corr),
                         f"The correlation is {corr['r']:+.3f}: on this run PQ error does not go with lower gain.",
                         "tokens")


def context_freq_corr(corr: dict) -> Finding:
    """Weak negative Pearson r between log10 context_freq and log10 freq (paper -0.12 … -0.02; CORR_RULE); a
    significant r outside the paper's range holds with a caveat in the note."""
    out = _corr_finding("log10 context freq vs log10 target freq: weak negative (paper r = -0.12 … -0.02)", corr,
                        _corr_text(corr), f"The correlation is {corr['r']:+.3f}, significantly positive, not negative "
                        "as in the paper.", "tokens")
    if out.ok and not -0.12 <= corr["r"] <= -0.02:
        return replace(out, note=f"Negative as in the paper, but outside its range (-0.12 … -0.02): {corr['r']:+.3f}.")
    return out


def crisis_by_bin(df: pd.DataFrame) -> pd.DataFrame:
    """Per bin of a bin_summary: PPL change of kNN-LM vs the LM with its interval, and the verdict
    (harms / helps / no significant difference, from the paired interval when the table has one); for a
    variant's table (mitigations.variant_run_summary) also its paired change vs the plain run and `vs_plain`."""
    cols = [c for c in ("freq_bin", "bin", "n_tokens", "n_docs", "ppl_lm", "ppl_knnlm", "ppl_change",
                        "ppl_change_ci_lo", "ppl_change_ci_hi") if c in df]
    paired = [c for c in ("change_vs_plain", "change_vs_plain_ci_lo", "change_vs_plain_ci_hi", "vs_plain") if c in df]
    out = df[cols].copy()
    out["delta_ppl"] = out["ppl_knnlm"] - out["ppl_lm"]
    if "knnlm_vs_lm" in df:
        out["kNN-LM"] = df["knnlm_vs_lm"].to_numpy()
    else:
        out["kNN-LM"] = ["harms" if d > 0 else "helps" if d < 0 else "no change" for d in out["delta_ppl"]]
    return out.join(df[paired]) if paired else out


def crisis_holds(df: pd.DataFrame) -> tuple[bool | None, str]:
    """(verdict, sentence): does kNN-LM raise PPL significantly in every seen rare bin (freq < 10^3)?"""
    rare = crisis_by_bin(bins_between(df, 0, RARE_BIN_MAX))
    if rare.empty:
        return None, "no evaluation target has 1 ≤ freq < 1,000: not evaluable"
    detail = ", ".join(f"{r.bin} {r.ppl_change:+.1%}{ci_text(r, 'ppl_change')}" if "ppl_change" in rare else r.bin
                       for r in rare.itertuples())
    verdicts = list(rare["kNN-LM"])
    if all(v == "harms" for v in verdicts):
        return True, f"holds: kNN-LM raises perplexity in every rare bin ({detail})"
    if any(v == "helps" for v in verdicts):
        return False, f"does not hold: kNN-LM lowers perplexity in a rare bin ({detail})"
    return None, f"is not significant in every rare bin ({detail}; 95% intervals)"


def evaluate(df: pd.DataFrame, run_k: int, corr_gain: dict, corr_ctx: dict, corr_freq_pq: dict,
             exact: pd.DataFrame | None = None, novelty: dict | None = None) -> list[Finding]:
    """Every SPEC §6 finding in the order of the paper's narrative, then the SPEC §8 exact-search rows
    (`exact`: the run's `exact.exact_bin_summary`, None when it has no exact search), then the SPEC §12
    context-novelty rows when `novelty` (novelty.novelty_findings) is given."""
    novelty_rows = [gains_from_found_contexts(novelty), novel_rare_harmed(novelty)] if novelty is not None else []
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
        *novelty_rows,
    ]


def to_frame(findings: list[Finding]) -> pd.DataFrame:
    """Findings as a table with a ✓ / ✗ / – verdict column (for display and CSV)."""
    mark = {True: "✓", False: "✗", None: "–"}
    return pd.DataFrame(
        {
            "verdict": ["≈" if f.ns else mark[f.ok] for f in findings],
            "claim": [f.claim for f in findings],
            "rule": [f.rule for f in findings],
            "this run": [f.numbers for f in findings],
            "note": [f.note for f in findings],
        }
    )
