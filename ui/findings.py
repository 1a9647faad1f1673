"""The paper's qualitative findings (SPEC §6) checked against one run (pure: no streamlit).

Input: the per-bin table of `queries.bin_summary` and three correlations
(`corr_pq_error_gain`, `corr_context_freq`, `corr_freq_pq_error`), optionally the exact-search table
(SPEC §8) and `queries.novelty_findings` (SPEC §12: rare target or novel context?). Output: one `Finding`
per claim with a verdict (True / False / None = not evaluable or, with `ns`, no significant
difference), the numbers behind it, and a plain sentence where the run disagrees with the
paper. Per-bin claims are decided by the SPEC §11 intervals of the tables (`*_ci_lo`,
`*_ci_hi`): a claim holds only where the interval of the difference excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from knnlm_core.bins import bin_label
from knnlm_core.bootstrap import MIN_TOKENS

RARE_BIN_MAX = 2  # rare = freq < 10^3 (bins 1–9, 10–99, 100–999), as in the paper's crossover
MIN_CELL_TOKENS = MIN_TOKENS  # a two-way cell named in the novelty sentence has at least as many tokens as an interval needs


@dataclass(frozen=True)
class Finding:
    """One claim of Nishida et al. 2025 and what this run says about it."""

    claim: str  # the paper's statement
    ok: bool | None  # True: the run agrees; False: it disagrees; None: not evaluable here
    numbers: str  # the values behind the verdict
    note: str = ""  # plain sentence when the run disagrees or cannot be checked
    ns: bool = False  # ok is None because the intervals show no significant difference (SPEC §11)


def _ci(row, col: str, fmt: str = "{:+.1%}") -> str:
    """' [lo, hi]' of a row's interval columns, or ' [no interval]'."""
    lo, hi = getattr(row, f"{col}_ci_lo", float("nan")), getattr(row, f"{col}_ci_hi", float("nan"))
    if pd.isna(lo) or pd.isna(hi):
        return " [no interval]"
    return f" [{fmt.format(lo)}, {fmt.format(hi)}]"


def _sign(row, col: str) -> int | None:
    """+1 / −1 when the interval of `col` (a difference) lies above / below 0, 0 when it includes 0,
    None when the bin has no interval (too few tokens or documents)."""
    lo, hi = getattr(row, f"{col}_ci_lo", float("nan")), getattr(row, f"{col}_ci_hi", float("nan"))
    if pd.isna(lo) or pd.isna(hi):
        return None
    return 1 if lo > 0 else -1 if hi < 0 else 0


def _undecided(bins: list[str], signs: list[int | None]) -> str:
    """Why a claim is undecided: the bins without a significant difference and those without an interval."""
    parts = []
    ns = [b for b, s in zip(bins, signs, strict=True) if s == 0]
    none = [b for b, s in zip(bins, signs, strict=True) if s is None]
    if ns:
        parts.append(f"No significant difference in {', '.join(ns)}: the 95% interval includes 0.")
    if none:
        parts.append(f"No interval in {', '.join(none)} (fewer than 30 tokens or 5 documents).")
    return " ".join(parts)


def _is_ns(ok: bool | None, signs: list[int | None]) -> bool:
    """Undecided because of the data (every bin has an interval, some include 0), not for lack of one."""
    return ok is None and all(s is not None for s in signs)


def _decide(signs: list[int], want: list[int]) -> bool | None:
    """True when every sign is the wanted one, False when any is significantly the opposite, else None."""
    if any(s == -w for s, w in zip(signs, want, strict=True)):
        return False
    return True if all(s == w for s, w in zip(signs, want, strict=True)) else None


def _bins(df: pd.DataFrame, lo: int, hi: int) -> pd.DataFrame:
    """Rows of seen bins lo..hi (inclusive)."""
    return df[(df["freq_bin"] >= lo) & (df["freq_bin"] <= hi)]


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _corr_text(c: dict) -> str:
    return f"r = {c['r']:.3f} (n = {c['n']:,}, p = {c['p']:.2g})"


def helps_high_hurts_low(df: pd.DataFrame) -> Finding:
    """kNN-LM lowers PPL in the highest bin and raises it in the lowest seen bin (paired intervals)."""
    claim = "kNN-LM helps high-frequency bins and hurts low-frequency ones (crossover ≈ 10^3 on GPT2-XL)"
    seen = df[df["freq_bin"] >= 0]
    if len(seen) < 2:
        return Finding(claim, None, "fewer than two seen bins", "Not evaluable: the run has too few frequency bins.")
    if "ppl_change" not in seen:
        seen = seen.assign(ppl_change=seen["ppl_knnlm"] / seen["ppl_lm"] - 1)
    low, high = seen.iloc[0], seen.iloc[-1]
    numbers = "; ".join(f"{r.bin}: {r.ppl_lm:.1f} → {r.ppl_knnlm:.1f} ({r.ppl_change:+.1%}{_ci(r, 'ppl_change')})"
                        for r in seen.itertuples())
    has_ci = "ppl_change_ci_lo" in seen
    signs = [_sign(low, "ppl_change"), _sign(high, "ppl_change")] if has_ci else \
        [int(np.sign(low.ppl_change)), int(np.sign(high.ppl_change))]
    ok = _decide(signs, [1, -1])
    note = ""
    if ok is False:
        helped = ", ".join(seen.loc[seen["ppl_change"] < 0, "bin"]) or "no bin"
        note = (
            f"On this run kNN-LM lowers perplexity in {helped}; the paper has it raising perplexity in the rare "
            f"bins ({low.bin}: {low.ppl_change:+.1%}) while lowering it in the frequent ones ({high.bin}: "
            f"{high.ppl_change:+.1%})."
        )
    elif ok is None:
        note = _undecided([low.bin, high.bin], signs)
    return Finding(claim, ok, numbers, note, ns=_is_ns(ok, signs))


def pknn_below_plm_low(df: pd.DataFrame) -> Finding:
    """Mean p_kNN < mean p_LM in every seen bin below 10^3 (paired interval of the difference)."""
    claim = "p_kNN < p_LM for low-frequency targets (freq < 10^3)"
    low = _bins(df, 0, 2)
    if low.empty:
        return Finding(claim, None, "no bin below 10^3", "Not evaluable: no evaluation target has freq < 1,000.")
    if "p_knn_minus_p_lm" not in low:
        low = low.assign(p_knn_minus_p_lm=low["mean_p_knn"] - low["mean_p_lm"])
    numbers = "; ".join(f"{r.bin}: p_kNN {r.mean_p_knn:.4f} vs p_LM {r.mean_p_lm:.4f} "
                        f"(Δ {r.p_knn_minus_p_lm:+.4f}{_ci(r, 'p_knn_minus_p_lm', '{:+.4f}')})" for r in low.itertuples())
    has_ci = "p_knn_minus_p_lm_ci_lo" in low
    signs = [_sign(r, "p_knn_minus_p_lm") if has_ci else int(np.sign(r.p_knn_minus_p_lm)) for r in low.itertuples()]
    ok = _decide(signs, [-1] * len(signs))
    bad = [r.bin for r, s in zip(low.itertuples(), signs) if s == 1]
    note = "" if ok else (f"In {', '.join(bad)} the mean p_kNN is above the mean p_LM, unlike the paper." if bad else
                          _undecided(list(low["bin"]), signs))
    return Finding(claim, ok, numbers, note, ns=_is_ns(ok, signs))


def hit_below_half(df: pd.DataFrame, k: int, hi_bin: int, run_k: int) -> Finding:
    """hit@k < 50% in every seen bin up to hi_bin (interval below 0.5); not measured when the run has no
    hit@k (k > run k). A smaller cut-off never stands in for k: hit@64 < 50% says nothing about hit@1024."""
    claim = f"hit@{k} < 50% for freq < {10 ** (hi_bin + 1):,}"
    col = f"hit_{k}"
    if col not in df.columns or not df[col].notna().any():
        return Finding(claim, None, f"hit@{k} not measured",
                       f"Not measured: the run retrieved k = {run_k} neighbours, fewer than {k}.")
    sub = _bins(df, 0, hi_bin)
    if sub.empty:
        return Finding(claim, None, "no such bin", f"Not evaluable: no target with freq < {10 ** (hi_bin + 1):,}.")
    numbers = "; ".join(f"{r.bin}: {_pct(getattr(r, col))}{_ci(r, col, '{:.1%}')}" for r in sub.itertuples())
    # Without interval columns (or a bin without an interval) the point value decides, as before SPEC §11.
    lo = sub.get(f"{col}_ci_lo", sub[col]).fillna(sub[col])
    hi = sub.get(f"{col}_ci_hi", sub[col]).fillna(sub[col])
    signs = [(-1 if h < 0.5 else 1 if low_ >= 0.5 else 0) for low_, h in zip(lo, hi, strict=True)]
    ok = _decide(signs, [-1] * len(signs))
    bad = [b for b, s in zip(sub["bin"], signs) if s == 1]
    note = "" if ok else (f"The target is among the first {k} neighbours at least half of the time in {', '.join(bad)}."
                          if bad else "The 95% interval of hit@k includes 50% in "
                          f"{', '.join(b for b, s in zip(sub['bin'], signs) if s == 0)}: no significant difference.")
    return Finding(claim, ok, numbers, note, ns=ok is None)


def _harmed_rare_bins(claim: str, exact: pd.DataFrame | None) -> pd.DataFrame | Finding:
    """The rare bins whose PPL the index's kNN-LM raises (significantly, when the table has intervals),
    or the Finding saying why there are none."""
    if exact is None or exact.empty:
        return Finding(claim, None, "no exact search", "Not measured: the run has no exact-search comparison.")
    rare = _bins(exact, 0, RARE_BIN_MAX)
    if "knnlm_vs_lm" in rare:
        harmed = rare[rare["knnlm_vs_lm"] == "harms"]
    else:
        harmed = rare[rare["ppl_ivf_pq"] > rare["ppl_lm"]]
    if harmed.empty:
        return Finding(claim, None, "no harmed rare bin",
                       "Not evaluable: kNN-LM harms no rare bin significantly on this run.")
    return harmed


def _exact_finding(claim: str, exact: pd.DataFrame | None, col: str, want: int, numbers_fmt, notes: dict) -> Finding:
    """Shared logic of the two SPEC §8 findings: over the harmed rare bins, the sign of `col`'s interval."""
    harmed = _harmed_rare_bins(claim, exact)
    if isinstance(harmed, Finding):
        return harmed
    numbers = "; ".join(numbers_fmt(r) for r in harmed.itertuples())
    if f"{col}_ci_lo" in harmed:
        signs = [_sign(r, col) for r in harmed.itertuples()]
    else:
        signs = [int(np.sign(getattr(r, col))) for r in harmed.itertuples()]
    ok = _decide(signs, [want] * len(signs))
    wrong = [r.bin for r, s in zip(harmed.itertuples(), signs) if s == -want]
    same = [r.bin for r, s in zip(harmed.itertuples(), signs) if s == 0]
    if ok or wrong:
        note = notes["wrong"].format(", ".join(wrong)) if wrong else ""
    else:
        note = notes["ns"].format(", ".join(same)) if same else _undecided(list(harmed["bin"]), signs)
    return Finding(claim, ok, numbers, note, ns=_is_ns(ok, signs))


def quantization_explains_rare_harm(exact: pd.DataFrame | None) -> Finding:
    """In the rare bins that kNN-LM harms (IVFPQ), exact search lowers the kNN-LM perplexity (SPEC §8)."""
    if exact is not None and "change_exact_vs_ivf_pq" not in exact:
        exact = exact.assign(change_exact_vs_ivf_pq=exact["ppl_exact"] / exact["ppl_ivf_pq"] - 1)
    return _exact_finding(
        "approximate (PQ) search adds to the rare-bin harm: exact search lowers kNN-LM PPL there", exact,
        "change_exact_vs_ivf_pq", -1,
        lambda r: (f"{r.bin}: {r.ppl_ivf_pq:.1f} (IVFPQ) → {r.ppl_exact:.1f} (exact; "
                   f"{r.change_exact_vs_ivf_pq:+.1%}{_ci(r, 'change_exact_vs_ivf_pq')}), explains "
                   f"{_pct(r.share_explained_by_quantization)}"),
        {"wrong": "In {} exact search raises kNN-LM's perplexity: the rare-bin harm is not caused by quantization here.",
         "ns": "In {} exact search makes no significant difference to kNN-LM's perplexity."})


def crisis_survives_exact(exact: pd.DataFrame | None) -> Finding:
    """With exact search, kNN-LM still raises PPL in the rare bins (quantization is not the whole cause)."""
    if exact is not None and "change_exact_vs_lm" not in exact:
        exact = exact.assign(change_exact_vs_lm=exact["ppl_exact"] / exact["ppl_lm"] - 1)
    return _exact_finding(
        "the rare-bin harm survives exact search (PQ is not the whole cause)", exact, "change_exact_vs_lm", 1,
        lambda r: f"{r.bin}: LM {r.ppl_lm:.1f}, exact kNN-LM {r.ppl_exact:.1f} ({r.change_exact_vs_lm:+.1%}"
                  f"{_ci(r, 'change_exact_vs_lm')})",
        {"wrong": "With exact search kNN-LM no longer harms {}: there PQ is the cause.",
         "ns": "With exact search the harm in {} is no longer significant."})


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
    """Per bin of a bin_summary: PPL change of kNN-LM vs the LM with its interval, and the verdict
    (harms / helps / no significant difference, from the paired interval when the table has one)."""
    cols = [c for c in ("freq_bin", "bin", "n_tokens", "n_docs", "ppl_lm", "ppl_knnlm", "ppl_change",
                        "ppl_change_ci_lo", "ppl_change_ci_hi") if c in df]
    out = df[cols].copy()
    out["delta_ppl"] = out["ppl_knnlm"] - out["ppl_lm"]
    if "knnlm_vs_lm" in df:
        out["kNN-LM"] = df["knnlm_vs_lm"].to_numpy()
    else:
        out["kNN-LM"] = ["harms" if d > 0 else "helps" if d < 0 else "no change" for d in out["delta_ppl"]]
    return out


def crisis_holds(df: pd.DataFrame) -> tuple[bool | None, str]:
    """(verdict, sentence): does kNN-LM raise PPL significantly in every seen rare bin (freq < 10^3)?"""
    rare = crisis_by_bin(_bins(df, 0, RARE_BIN_MAX))
    if rare.empty:
        return None, "no evaluation target has 1 ≤ freq < 1,000: not evaluable"
    detail = ", ".join(f"{r.bin} {r.ppl_change:+.1%}{_ci(r, 'ppl_change')}" if "ppl_change" in rare else r.bin
                       for r in rare.itertuples())
    verdicts = list(rare["kNN-LM"])
    if all(v == "harms" for v in verdicts):
        return True, f"holds: kNN-LM raises perplexity in every rare bin ({detail})"
    if any(v == "helps" for v in verdicts):
        return False, f"does not hold: kNN-LM lowers perplexity in a rare bin ({detail})"
    return None, f"is not significant in every rare bin ({detail}; 95% intervals)"


def _d(d: dict, col: str, fmt: str = "{:+.1%}") -> str:
    """' [lo, hi]' of a dict's interval keys, or ' [no interval]' (as _ci for a table row)."""
    lo, hi = d.get(f"{col}_ci_lo", float("nan")), d.get(f"{col}_ci_hi", float("nan"))
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return " [no interval]"
    return f" [{fmt.format(lo)}, {fmt.format(hi)}]"


def gains_from_found_contexts(nov: dict) -> Finding:
    """SPEC §12: positions whose context occurs in the datastore (L_t >= 4) carry most (> 50%) of kNN-LM's
    total NLL gain, decided by the interval of that share (queries.novelty_findings)."""
    m = nov["min_len"]
    claim = f"kNN-LM's gains come mostly from positions whose context occurs in the datastore (L_t ≥ {m})"
    found, other = nov["found"], nov["other"]
    if not found or not other:
        side = "no" if not found else "every"
        return Finding(claim, None, f"{side} position has L_t ≥ {m}",
                       f"Not evaluable: {side} evaluation position's context occurs in the datastore ({m}+ tokens).")
    if nov["total_gain"] <= 0:
        return Finding(claim, None, f"total NLL gain {nov['total_gain']:+.1f} nats over {nov['n_tokens']:,} tokens",
                       "Not evaluable: kNN-LM has no net gain on this run, so there is no gain to attribute.")
    share = found["share_of_gain"]
    numbers = (f"L_t ≥ {m}: {_pct(found['token_share'])} of the {nov['n_tokens']:,} tokens carry "
               f"{share:.1%}{_d(found, 'share_of_gain', '{:.1%}')} of the total NLL gain "
               f"({nov['total_gain']:+.1f} nats); mean gain {found['mean_gain']:+.3f}{_d(found, 'mean_gain', '{:+.3f}')} "
               f"vs {other['mean_gain']:+.3f}{_d(other, 'mean_gain', '{:+.3f}')} nats at L_t < {m}; mean copy share of "
               f"p_kNN {_pct(found.get('mean_copy_share'))} vs {_pct(other.get('mean_copy_share'))}")
    lo, hi = found.get("share_of_gain_ci_lo"), found.get("share_of_gain_ci_hi")
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return Finding(claim, None, numbers, "No interval for the share (fewer than 30 tokens or 5 documents on a "
                       "side, or resamples without a net gain).")
    ok = True if lo > 0.5 else False if hi < 0.5 else None
    note = ""
    if ok is False:
        note = f"Most of the gain comes from positions whose last {m} context tokens never occur in the datastore."
    elif ok is None:
        note = "The 95% interval of the share includes 50%: no significant majority either way."
    elif share <= found["token_share"]:
        note = (f"A majority, but no more than these positions' share of the tokens ({_pct(found['token_share'])}): "
                "the gain does not concentrate there.")
    return Finding(claim, ok, numbers, note, ns=ok is None)


def _cell_text(d: dict, where: str) -> str:
    """'where: PPL a → b (change [lo, hi], verdict), n = … tokens in … documents' (no verdict without an interval)."""
    verdict = "" if d["knnlm_vs_lm"] == "no interval" else f", {d['knnlm_vs_lm']}"
    return (f"{where}: PPL {d['ppl_lm']:.1f} → {d['ppl_knnlm']:.1f} ({d['ppl_change']:+.1%}{_d(d, 'ppl_change')}"
            f"{verdict}), n = {int(d['n_tokens']):,} tokens in {int(d['n_docs'])} documents")


def novel_rare_harmed(nov: dict) -> Finding:
    """SPEC §12: in novel contexts (L_t <= 1) kNN-LM still raises the rare targets' PPL (paired interval)."""
    n_max, m = nov["novel_max_len"], nov["min_len"]
    claim = f"within novel contexts (L_t ≤ {n_max}), rare targets (1 ≤ freq < 1,000) are still harmed by kNN-LM"
    novel, found = nov["novel_rare"], nov["found_rare"]
    if not novel:
        return Finding(claim, None, "no such token", f"Not evaluable: no rare target follows a context with L_t ≤ {n_max}.")
    numbers = _cell_text(novel, f"L_t ≤ {n_max}, freq 1–999")
    if found:
        numbers += "; for contrast " + _cell_text(found, f"L_t ≥ {m}, freq 1–999")
    sign = {"harms": 1, "helps": -1, "no significant difference": 0}.get(novel["knnlm_vs_lm"])
    ok = None if sign in (None, 0) else sign == 1
    note = ""
    if ok is False:
        note = "kNN-LM lowers the rare targets' perplexity even where the context is novel."
    elif sign == 0:
        note = "The 95% interval of the PPL change includes 0: no significant difference."
    elif sign is None:
        note = "No interval (fewer than 30 tokens or 5 documents)."
    return Finding(claim, ok, numbers, note, ns=sign == 0)


def evaluate(df: pd.DataFrame, run_k: int, corr_gain: dict, corr_ctx: dict, corr_freq_pq: dict,
             exact: pd.DataFrame | None = None, novelty: dict | None = None) -> list[Finding]:
    """Every SPEC §6 finding in the order of the paper's narrative, then the SPEC §8 exact-search rows
    (`exact`: the run's `queries.exact_bin_summary`, None when it has no exact search), then the SPEC §12
    context-novelty rows when `novelty` (queries.novelty_findings) is given."""
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
            "this run": [f.numbers for f in findings],
            "note": [f.note for f in findings],
        }
    )


def _change_phrase(r) -> str:
    """'+x.x% [lo, hi] (verdict)' of a novelty_summary row's kNN-LM change (no verdict without an interval)."""
    verdict = "" if r.knnlm_vs_lm == "no interval" else f" ({r.knnlm_vs_lm})"
    return f"{r.ppl_change:+.1%}{_ci(r, 'ppl_change')}{verdict}"


def novelty_sentence(by_ctx: pd.DataFrame, cells: pd.DataFrame) -> str:
    """What the two-way view (queries.novelty_summary) shows on a run: kNN-LM's PPL change at the lowest and
    the highest context-match-length bins, the seen-target cells (>= MIN_CELL_TOKENS tokens) where its change
    is lowest and highest, and where the NLL gain concentrates (the cells with the largest share of it)."""
    if by_ctx.empty:
        return "No evaluation token on this run."
    n = by_ctx["n_tokens"].sum()
    lo, hi = by_ctx.iloc[0], by_ctx.iloc[-1]
    parts = [f"kNN-LM changes perplexity by {_change_phrase(lo)} where L_t is {lo.L_t} ({_pct(lo.n_tokens / n)} of "
             f"tokens) and by {_change_phrase(hi)} where it is {hi.L_t} ({_pct(hi.n_tokens / n)})."]
    seen = cells[(cells["freq_bin"] >= 0) & (cells["n_tokens"] >= MIN_CELL_TOKENS)].sort_values("ppl_change")
    if len(seen) >= 2:
        best, worst = seen.iloc[0], seen.iloc[-1]
        parts.append(f"Among seen targets (cells of ≥ {MIN_CELL_TOKENS} tokens) its change is lowest at freq {best.bin} × "
                     f"L_t {best.L_t}: {_change_phrase(best)}, and highest at freq {worst.bin} × L_t {worst.L_t}: "
                     f"{_change_phrase(worst)}.")
    if cells["share_of_gain"].notna().any():
        top = cells.sort_values("share_of_gain", ascending=False).head(3)
        where = "; ".join(f"freq {r.bin} × L_t {r.L_t} ({r.share_of_gain:.0%}{_ci(r, 'share_of_gain', '{:.0%}')} "
                          f"of the gain from {_pct(r.n_tokens / n)} of tokens)" for r in top.itertuples())
        parts.append(f"The NLL gain concentrates in {where}.")
    else:
        parts.append("kNN-LM has no net NLL gain on this run, so no share of it is reported.")
    return " ".join(parts)
