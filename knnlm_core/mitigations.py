"""Mitigations beside the plain run, per frequency bin (SPEC §9; issue 10).

Pure pandas / numpy over per-bin summaries (`read.mitigations.variant_bin_summary`: freq_bin, bin,
n_tokens, ppl_lm, ppl, mean_gain, share_harmed, mean_p_knn, mean_lambda): each variant's
change vs the plain kNN-LM per bin with a verdict, one sentence per variant on the rare and
the frequent bins, and the ORACLE per-frequency-bin λ (adaptive.oracle_by_bin): the target's
bin is unknown at test time, so that row is an upper bound, never a mitigation. `with_variant` turns
the run's bin_summary into a variant's (every kNN-LM figure, interval and verdict replaced; the run's
own retrieval / datastore columns kept and labelled by `label_own`), for Compare (issue 21).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from knnlm_core import adaptive
from knnlm_core.bins import bin_labels

PLAIN = "plain"  # the run itself (mitigations.variant)
SAME_PCT = 0.5  # a relative PPL change within ±0.5% counts as "same": smaller changes are noise on small bins
RARE_BINS = (0, 2)  # rare: 1 <= freq < 1,000 (bins 1–9 … 100–999), the paper's crossover
FREQUENT_MIN_BIN = 4  # frequent: freq >= 10,000
VERDICTS = ("helps", "hurts", "same", "baseline")
SUMMARY_COLS = ("n_tokens", "ppl_lm", "ppl", "mean_gain", "share_harmed", "mean_p_knn", "mean_lambda")


def verdict(delta_pct: float) -> str:
    """'helps' (PPL down by more than SAME_PCT %), 'hurts' (up by more), else 'same'."""
    if delta_pct < -SAME_PCT:
        return "helps"
    return "hurts" if delta_pct > SAME_PCT else "same"


def compare_to_plain(per_variant: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table, one row per (variant, bin): the variant's summary columns, ppl_plain, delta_ppl,
    delta_ppl_pct (relative, %), delta_share_harmed and verdict ('baseline' for plain itself)."""
    if PLAIN not in per_variant:
        raise ValueError(f"per_variant needs the {PLAIN!r} summary to compare against")
    base = per_variant[PLAIN][["freq_bin", "ppl", "share_harmed"]].rename(
        columns={"ppl": "ppl_plain", "share_harmed": "share_harmed_plain"})
    parts = []
    for name, df in per_variant.items():
        cols = ["freq_bin", "bin", *[c for c in SUMMARY_COLS if c in df], *(["lam"] if "lam" in df else [])]
        out = df[cols].merge(base, on="freq_bin", how="left")
        out.insert(0, "variant", name)
        out["delta_ppl"] = out["ppl"] - out["ppl_plain"]
        out["delta_ppl_pct"] = 100.0 * out["delta_ppl"] / out["ppl_plain"]
        out["delta_share_harmed"] = out["share_harmed"] - out.pop("share_harmed_plain")
        out["verdict"] = "baseline" if name == PLAIN else [verdict(d) for d in out["delta_ppl_pct"]]
        if "change_vs_plain_ci_lo" in df:  # SPEC §11: the paired interval of the change decides the verdict
            for end in ("lo", "hi"):
                out[f"delta_ppl_pct_ci_{end}"] = 100.0 * df[f"change_vs_plain_ci_{end}"].to_numpy()
            out["n_docs"], out["ci_note"] = df["n_docs"].to_numpy(), df["ci_note"].to_numpy()
            if name != PLAIN:
                out["verdict"] = df["vs_plain"].to_numpy()
        parts.append(out)
    out = pd.concat(parts, ignore_index=True)
    first = ["variant", "freq_bin", "bin", "n_tokens", "n_docs", "ppl_lm", "ppl_plain", "ppl", "delta_ppl",
             "delta_ppl_pct", "delta_ppl_pct_ci_lo", "delta_ppl_pct_ci_hi", "verdict", "share_harmed",
             "delta_share_harmed"]
    return out[[c for c in first if c in out] + [c for c in out if c not in first]]


def _pooled_ppl(df: pd.DataFrame, col: str) -> float:
    """PPL over the union of the rows' bins: exp(Σ n · ln ppl / Σ n) (NaN when empty)."""
    n = df["n_tokens"].to_numpy(dtype=np.float64)
    if n.sum() == 0:
        return float("nan")
    return float(np.exp(np.sum(n * np.log(df[col].to_numpy(dtype=np.float64))) / n.sum()))


def overall_from_bins(summary: pd.DataFrame) -> dict:
    """Totals of a per-bin summary: n_tokens, ppl_lm, ppl (pooled over bins), share_harmed (token-weighted)."""
    n = summary["n_tokens"].to_numpy(dtype=np.float64)
    return {"n_tokens": int(n.sum()), "ppl_lm": _pooled_ppl(summary, "ppl_lm"), "ppl": _pooled_ppl(summary, "ppl"),
            "share_harmed": float(np.sum(n * summary["share_harmed"].to_numpy(dtype=np.float64)) / n.sum())}


def group_change_pct(compared: pd.DataFrame, variant: str, lo: int, hi: int) -> float:
    """Relative PPL change (%) of `variant` vs plain pooled over bins lo..hi (NaN without tokens)."""
    rows = compared[(compared["variant"] == variant) & compared["freq_bin"].between(lo, hi)]
    return 100.0 * (_pooled_ppl(rows, "ppl") / _pooled_ppl(rows, "ppl_plain") - 1.0) if len(rows) else float("nan")


def _group_phrase(groups: pd.DataFrame, grp: str, what: str) -> str | None:
    """'<verdict> <what>: PPL +x.x% [lo, hi]' from a read.mitigations.variant_group_changes row (SPEC §11), None if absent."""
    row = groups[groups["grp"] == grp]
    if row.empty:
        return None
    r = row.iloc[0]
    interval = "no interval" if pd.isna(r["change_vs_plain_ci_lo"]) else \
        f"95% CI {100 * r['change_vs_plain_ci_lo']:+.1f} … {100 * r['change_vs_plain_ci_hi']:+.1f}%"
    verb = {"helps": "helps", "hurts": "hurts"}.get(r["vs_plain"], "no significant difference on")
    return f"{verb} {what}: PPL {100 * r['change_vs_plain']:+.1f}% ({interval}, {int(r['n_docs'])} documents)"


def rare_bin_verdict(compared: pd.DataFrame, variant: str, label: str | None = None,
                     groups: pd.DataFrame | None = None) -> str:
    """One sentence: does `variant` help or hurt the rare bins (freq < 1,000), and what does it
    cost (or give) the frequent bins (freq ≥ 10k); pooled PPL change vs plain. With `groups`
    (read.mitigations.variant_group_changes) the verdicts come from the paired intervals (SPEC §11),
    otherwise from the SAME_PCT threshold."""
    if groups is not None:
        rare = _group_phrase(groups, "rare", "the rare bins (freq < 1,000)") or "no rare-bin tokens in this run"
        freq = _group_phrase(groups, "frequent", "the frequent bins (≥ 10k)") or "no frequent-bin tokens in this run"
        return f"{label or variant}: {rare}; {freq}."
    rare = group_change_pct(compared, variant, *RARE_BINS)
    freq = group_change_pct(compared, variant, FREQUENT_MIN_BIN, 10**6)
    if np.isnan(rare):
        first = "no rare-bin (freq < 1,000) tokens in this run"
    else:
        first = {"helps": "helps the rare bins (freq < 1,000)", "hurts": "hurts the rare bins (freq < 1,000)",
                 "same": "leaves the rare bins (freq < 1,000) about the same"}[verdict(rare)] + f": PPL {rare:+.1f}%"
    if np.isnan(freq):
        second = "no frequent-bin (freq ≥ 10k) tokens in this run"
    else:
        second = {"hurts": f"costs the frequent bins (≥ 10k) {freq:.1f}%",
                  "helps": f"also helps the frequent bins (≥ 10k): PPL {freq:+.1f}%",
                  "same": f"the frequent bins (≥ 10k) stay about the same ({freq:+.1f}%)"}[verdict(freq)]
    return f"{label or variant}: {first}; {second}."


def bin_summary_from_arrays(
    freq_bin: np.ndarray, p_lm: np.ndarray, p_knn: np.ndarray, lam: float | np.ndarray
) -> pd.DataFrame:
    """Per bin (ascending) the columns of read.mitigations.variant_bin_summary from (T,) arrays and λ
    (scalar or (T,)): p_kNNLM = λ p_kNN + (1 − λ) p_LM, harmed = its NLL > the LM's."""
    p_lm, p_knn = np.asarray(p_lm, np.float64), np.asarray(p_knn, np.float64)
    lam = np.broadcast_to(np.asarray(lam, np.float64), p_lm.shape)
    assert p_lm.shape == p_knn.shape == np.shape(freq_bin) and p_lm.ndim == 1, (p_lm.shape, p_knn.shape)
    bins, inv = np.unique(np.asarray(freq_bin), return_inverse=True)
    inv = inv.ravel()
    n = np.bincount(inv)  # (B,)
    with np.errstate(divide="ignore"):
        nll_lm, nll = -np.log(p_lm), -np.log(lam * p_knn + (1.0 - lam) * p_lm)  # (T,)

    def mean(x: np.ndarray) -> np.ndarray:
        return np.bincount(inv, weights=x, minlength=len(bins)) / n

    return pd.DataFrame({
        "freq_bin": bins, "bin": bin_labels(bins), "n_tokens": n, "ppl_lm": np.exp(mean(nll_lm)),
        "ppl": np.exp(mean(nll)), "mean_gain": mean(nll_lm - nll), "share_harmed": mean((nll > nll_lm).astype(float)),
        "mean_p_knn": mean(p_knn), "mean_lambda": mean(lam),
    })


def oracle_summary(freq_bin: np.ndarray, p_lm: np.ndarray, p_knn: np.ndarray,
                   with_nll: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
    """ORACLE (upper bound) per bin: λ of the bin = adaptive.oracle_by_bin (fitted on these very
    targets' bins), with the columns of bin_summary_from_arrays plus `lam`; with_nll: also the (T,)
    per-position NLL under it (for SPEC §11 intervals)."""
    lam_by_bin = adaptive.oracle_by_bin(freq_bin, p_lm, p_knn)
    bins, inv = np.unique(np.asarray(freq_bin), return_inverse=True)
    lam = np.array([lam_by_bin[int(b)] for b in bins])[inv.ravel()]  # (T,)
    out = bin_summary_from_arrays(freq_bin, p_lm, p_knn, lam)
    out["lam"] = [lam_by_bin[int(b)] for b in out["freq_bin"]]
    if not with_nll:
        return out
    with np.errstate(divide="ignore"):
        nll = -np.log(lam * np.asarray(p_knn, np.float64) + (1.0 - lam) * np.asarray(p_lm, np.float64))
    return out, nll


KNN_FIGURES = ("ppl_knnlm", "mean_p_knn", "mean_gain", "share_harmed", "ppl_change", "p_knn_minus_p_lm")
KNN_VERDICT = "knnlm_vs_lm"  # read.bins.bin_summary's verdict of ppl_change's interval
VS_PLAIN = ("change_vs_plain", "vs_plain")  # a variant's paired change vs the plain run and its verdict
OWN_PREFIXES = ("hit_", "nontarget_share", "mean_query_pq_error", "n_types_datastore", "mean_cv",
                "mean_contamination", "mean_pq_error")  # retrieval / datastore columns of the plain index
OWN_SUFFIX = " (plain run)"


def _figure(col: str) -> str:
    """The figure a column belongs to ('x' for x, x_ci_lo, x_ci_hi)."""
    return col.removesuffix("_ci_lo").removesuffix("_ci_hi")


def with_variant(summary: pd.DataFrame, variant: pd.DataFrame) -> pd.DataFrame:
    """A read.bins.bin_summary table with every kNN-LM figure (KNN_FIGURES, with its `_ci_lo` / `_ci_hi`), the
    verdict KNN_VERDICT and the paired change vs plain (VS_PLAIN, intervals) taken from a variant's per-bin
    interval table (read.mitigations.variant_run_intervals), matched by freq_bin. The LM's columns and the run's own
    (own_columns) are kept; ValueError when the variant lacks a kNN-LM figure the summary has."""
    missing = [c for c in (*KNN_FIGURES, KNN_VERDICT) if c in summary and c not in variant]
    if missing:
        raise ValueError(f"the variant table lacks {', '.join(missing)}: the plain run's would be shown")
    v = variant.set_index("freq_bin")
    out = summary.copy()
    for col in v.columns:
        if _figure(col) in (*KNN_FIGURES, *VS_PLAIN) or col == KNN_VERDICT:
            out[col] = out["freq_bin"].map(v[col]).to_numpy()
    return out


def own_columns(columns) -> list[str]:
    """The columns of a bin_summary that stay the run's own under a variant (hit rates, non-target share,
    query / type PQ error, contamination, cv, datastore type counts of the plain index and datastore)."""
    return [c for c in columns if c.startswith(OWN_PREFIXES)]


def label_own(df: pd.DataFrame) -> pd.DataFrame:
    """The table with OWN_SUFFIX appended to the names of its own_columns (for a variant's display)."""
    return df.rename(columns={c: c + OWN_SUFFIX for c in own_columns(df.columns)})


def variants_table(variants: pd.DataFrame, totals: dict[str, dict], oracle: pd.DataFrame | None = None,
                   run_tau: float | None = None) -> pd.DataFrame:
    """The mitigations rows for display: label, family, τ, λ ('per position' when adaptive), ε, validation
    PPL, evaluation PPL / Δ vs plain / share harmed from `totals` ({variant: variant_overall dict}), notes;
    plus the oracle row (ORACLE_LABEL) from its per-bin summary when given."""
    lam = [("per position" if pd.notna(c) else "—" if pd.isna(v) else f"{v:g}")
           for v, c in zip(variants["lam"], variants["lam_column"])]
    out = pd.DataFrame({
        "variant": variants["variant"], "label": variants["label"], "family": variants["family"],
        "τ": variants["tau"], "λ": lam, "ε": variants["eps"], "validation PPL": variants["valid_ppl"],
        "evaluation PPL": [totals[v]["ppl"] for v in variants["variant"]],
        "share harmed": [totals[v]["share_harmed"] for v in variants["variant"]], "notes": variants["notes"],
    })
    if oracle is not None:
        o = overall_from_bins(oracle)
        out.loc[len(out)] = {
            "variant": adaptive.ORACLE_LABEL, "label": adaptive.ORACLE_LABEL, "family": "oracle", "τ": run_tau,
            "λ": "per frequency bin", "evaluation PPL": o["ppl"], "share harmed": o["share_harmed"],
            "notes": "λ of each frequency bin fitted on the evaluation targets' own bins (unknown at test time)"}
    plain = totals[PLAIN]["ppl"] if PLAIN in totals else float("nan")
    out.insert(out.columns.get_loc("share harmed"), "Δ PPL vs plain (%)", 100.0 * (out["evaluation PPL"] / plain - 1))
    return out
