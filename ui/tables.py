"""Reading labels and number formats for the dashboard's tables (issue 21 §6; pure pandas, no streamlit).

A page's frame keeps its raw column names: they are the CSV's headers (the CSV is data). `display_frame`
gives the copy a table shows and one entry per column: a human label ("PPL LM", "hit@16", "share harmed
95% CI low"), a printf format in the dialect of Streamlit's NumberColumn (sprintf-js with `,` for thousands)
chosen from the column's values, or None for a column that is hidden (`freq_bin` beside its label `bin`).
Shares and relative changes keep their fractions and use Streamlit's `percent` format (×100, 0–2 decimals). `render` formats one value in that dialect,
so tests read exactly what the table shows. Missing values are shown as empty cells (ui.show passes
`placeholder=""`); text columns have None replaced by "".

Rules: perplexity 2 decimals below 1,000, thousands separators and 0–1 decimals above; shares and mean
probabilities as percentages with 1–2 decimals; relative changes as signed percentages; per-token
probabilities with 3 significant digits; nats signed with 3 decimals; other numbers with fixed decimals
per column (3 below 10, 2 below 1,000, none above; 3 significant digits for a column of tiny values like ε).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

# Column kinds: how a value is scaled and formatted.
#   id: integer as is · count: integer with thousands separators · ppl: perplexity · dppl: signed PPL difference
#   share: fraction -> percent · change: relative change (fraction) -> signed percent · pct: already percent, signed
#   pp: difference of fractions -> signed percentage points · p: per-token probability (3 significant digits)
#   nats: signed nats · num: plain number (fixed decimals per column) · text / bool: as is
SCALED = {"share", "change", "pp"}  # fractions shown with Streamlit's "percent" format

LABELS: dict[str, tuple[str, str]] = {  # raw column -> (label, kind); every column a page shows is here or in PATTERNS
    # bins and counts
    "freq_bin": ("frequency bin (id)", "id"),
    "bin": ("frequency bin", "text"),
    "ctx_bin": ("L_t bin (id)", "id"),
    "L_t": ("context match length L_t", "text"),
    "n_tokens": ("tokens", "count"),
    "n_docs": ("documents", "count"),
    "n_types_eval": ("target types (evaluation)", "count"),
    "n_types_datastore": ("types (datastore)", "count"),
    "n_words": ("words", "count"),
    "n_word_types": ("word types", "count"),
    "n_eval": ("evaluation occurrences", "count"),
    "eval_count": ("evaluation occurrences", "count"),
    "occurrences": ("occurrences", "count"),
    "n_valid": ("validation positions", "count"),
    "n_types_in_bin": ("types in the bin", "count"),
    "n_target": ("neighbours carrying the target", "count"),
    "n_copy_share": ("tokens with a copy share", "count"),
    "freq": ("datastore frequency", "count"),
    "context_freq": ("last context token's frequency", "count"),
    # perplexities
    "ppl_lm": ("PPL LM", "ppl"),
    "ppl_knnlm": ("PPL kNN-LM", "ppl"),
    "ppl_knnlm_run": ("PPL kNN-LM (run)", "ppl"),
    "ppl_ivf_pq": ("PPL IVFPQ + PQ dist.", "ppl"),
    "ppl_ivf_exact": ("PPL IVFPQ + exact dist.", "ppl"),
    "ppl_exact": ("PPL exact search", "ppl"),
    "ppl_infgram": ("PPL ∞-gram interpolation", "ppl"),
    "ppl_plain": ("PPL plain kNN-LM", "ppl"),
    "ppl": ("PPL", "ppl"),
    "validation PPL": ("validation PPL", "ppl"),
    "evaluation PPL": ("evaluation PPL", "ppl"),
    "delta_ppl": ("Δ PPL", "dppl"),
    # relative changes (fractions) and their verdicts
    "ppl_change": ("PPL change kNN-LM vs LM", "change"),
    "infgram_change": ("PPL change ∞-gram vs LM", "change"),
    "knnlm_vs_infgram_change": ("PPL change kNN-LM vs ∞-gram", "change"),
    "change_ivf_exact_vs_ivf_pq": ("IVFPQ + exact dist. vs IVFPQ + PQ", "change"),
    "change_exact_vs_ivf_pq": ("exact search vs IVFPQ + PQ", "change"),
    "change_ivf_pq_vs_lm": ("IVFPQ + PQ vs LM", "change"),
    "change_exact_vs_lm": ("exact search vs LM", "change"),
    "ppl_knnlm_a_vs_b": ("PPL kNN-LM, A vs B", "change"),
    "ppl_lm_a_vs_b": ("PPL LM, A vs B", "change"),
    "change_vs_plain": ("PPL change vs plain kNN-LM", "change"),
    "vs_plain": ("vs plain kNN-LM", "text"),
    "delta_ppl_pct": ("Δ PPL vs plain", "pct"),
    "Δ PPL vs plain (%)": ("Δ PPL vs plain", "pct"),
    "knnlm_vs_lm": ("kNN-LM vs LM", "text"),
    "kNN-LM": ("kNN-LM vs LM", "text"),
    "knnlm_vs_infgram": ("kNN-LM vs ∞-gram", "text"),
    "exact_vs_ivf_pq": ("exact search vs IVFPQ + PQ", "text"),
    "exact_knnlm_vs_lm": ("exact kNN-LM vs LM", "text"),
    "a_vs_b": ("A vs B", "text"),
    "verdict": ("verdict", "text"),
    "ci_note": ("interval note", "text"),
    "resampling": ("resampling", "text"),
    # probabilities, shares, gains
    "mean_p_lm": ("mean p_LM", "share"),
    "mean_p_knn": ("mean p_kNN", "share"),
    "mean_p_knn_ivf_pq": ("mean p_kNN IVFPQ + PQ", "share"),
    "mean_p_knn_exact": ("mean p_kNN exact", "share"),
    "p_knn_minus_p_lm": ("p_kNN − p_LM", "pp"),
    "p_lm": ("p_LM", "p"),
    "p_knn": ("p_kNN", "p"),
    "p_knnlm": ("p_kNN-LM", "p"),
    "p_knn_ivf_pq": ("p_kNN IVFPQ + PQ", "p"),
    "p_knn_exact": ("p_kNN exact", "p"),
    "weight_in_p_knn": ("weight in p_kNN", "p"),
    "share_harmed": ("share harmed", "share"),
    "share harmed": ("share harmed", "share"),
    "delta_share_harmed": ("Δ share harmed vs plain", "pp"),
    "nontarget_share": ("non-target share", "share"),
    "share_explained_by_quantization": ("explained by quantization", "share"),
    "share_explained_by_distances": ("explained by PQ distances", "share"),
    "share_explained_by_neighbours": ("explained by IVFPQ neighbours", "share"),
    "share_of_gain": ("share of the gain", "share"),
    "mean_copy_share": ("mean copy share", "share"),
    "copy_share": ("copy share", "share"),
    "contamination": ("contamination", "share"),
    "mean_contamination": ("mean contamination", "share"),
    "percentile_in_bin": ("percentile in the bin", "share"),
    "mean_gain": ("mean gain (nats)", "nats"),
    "gain": ("gain (nats)", "nats"),
    "delta_nll_ivf_pq": ("Δ NLL IVFPQ + PQ (nats)", "nats"),
    "delta_nll_exact": ("Δ NLL exact (nats)", "nats"),
    "nll_saved_by_exact": ("NLL saved by exact (nats)", "nats"),
    # type statistics, distances, parameters
    "cv": ("cv", "num"),
    "mean_cv": ("mean cv", "num"),
    "pq_error_mean": ("PQ error (type mean)", "num"),
    "mean_pq_error": ("mean PQ error (types)", "num"),
    "mean_query_pq_error": ("mean PQ error (queries)", "num"),
    "query_pq_error": ("query PQ error", "num"),
    "mean_tokens_per_word": ("tokens per word", "num"),
    "distance_pq": ("distance (PQ)", "num"),
    "distance_exact": ("distance (exact)", "num"),
    "value": ("value", "num"),
    "bin_q25": ("bin 25th percentile", "num"),
    "bin_median": ("bin median", "num"),
    "bin_q75": ("bin 75th percentile", "num"),
    "lam": ("λ", "num"),
    "λ": ("λ", "num"),
    "mean_lambda": ("mean λ", "num"),
    "τ": ("τ", "num"),
    "ε": ("ε", "num"),
    "lo": ("from", "num"),
    "hi": ("to", "num"),
    # positions, ids, text
    "pos": ("position", "id"),
    "first_pos": ("first position", "id"),
    "token_id": ("token id", "id"),
    "entry": ("datastore entry", "id"),
    "rank": ("rank", "id"),
    "target_rank": ("target rank", "id"),
    "exact_target_rank": ("target rank (exact)", "id"),
    "overlap": ("context overlap (tokens)", "count"),
    "token": ("token", "text"),
    "word": ("word", "text"),
    "context": ("context", "text"),
    "metric": ("metric", "text"),
    "variant": ("variant", "text"),
    "label": ("variant name", "text"),
    "family": ("family", "text"),
    "notes": ("notes", "text"),
    "hit": ("target", "bool"),
    "copy": ("copy", "bool"),
    "in_index_top": ("also in the index's top", "bool"),
    "claim": ("claim", "text"),
    "this run": ("this run", "text"),
    "note": ("note", "text"),
    "rule": ("rule", "text"),
}

PATTERNS: list[tuple[re.Pattern, str, str]] = [  # (full-match pattern, label template, kind), tried in order
    (re.compile(r"hit_(\d+)"), r"hit@\1", "share"),
    (re.compile(r"hit_(\d+)_(index|exact)"), r"hit@\1 \2", "share"),
    (re.compile(r"recall_(\d+)"), r"recall@\1", "share"),
    # What-if scenarios and baselines (knnlm_core.whatif.scenario_table): ppl_<name>, change_<name>, <name>_vs_<base>
    (re.compile(r"ppl_(.+)"), r"PPL \1", "ppl"),
    (re.compile(r"change_(.+)"), r"PPL change \1", "change"),
    (re.compile(r"(.+)_vs_(.+)"), r"\1 vs \2", "text"),
]
CI_SUFFIX = {"lo": "95% CI low", "hi": "95% CI high"}
NUMERIC_LABELS = {"bin": ("bin", "id")}  # a numeric `bin` is some other binning's index (adaptive-λ rules)
HIDDEN_BESIDE = {"freq_bin": "bin", "ctx_bin": "L_t"}  # an id column hidden when its label column is shown


def _base(col: str) -> tuple[str, str]:
    """(base column, suffix shown after its label): `x [run]` -> (x, ' [run]'), `x (plain run)` ->
    (x, ' (plain run)') for names that are not themselves labelled; `x_ci_lo` -> (x, ' 95% CI low')."""
    if col in LABELS:
        return col, ""
    m = re.fullmatch(r"(.+?)( \[[^\]]*\]| \([^)]*\))", col, flags=re.S)
    if m:
        base, tail = _base(m.group(1))
        return base, tail + m.group(2)
    m = re.fullmatch(r"(.+)_ci_(lo|hi)", col)
    if m:
        return m.group(1), " " + CI_SUFFIX[m.group(2)]
    return col, ""


def describe(col: str) -> tuple[str, str] | None:
    """(label, kind) of a raw column name, or None when no label is defined for it."""
    base, tail = _base(str(col))
    if base in LABELS:
        label, kind = LABELS[base]
        return label + tail, kind
    for pattern, template, kind in PATTERNS:
        m = pattern.fullmatch(base)
        if m:
            return m.expand(template).replace("_", " ") + tail, kind
    return None


def unlabelled(df: pd.DataFrame) -> list[str]:
    """The columns of `df` without a label (a test asserts there are none on every page's frames)."""
    return [str(c) for c in df.columns if describe(c) is None]


def _finite(values: pd.Series) -> np.ndarray:
    """The column's finite values as float64 (missing ones dropped)."""
    x = pd.to_numeric(values, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    return x[np.isfinite(x)]


def _decimals(x: np.ndarray, small: float) -> int:
    """1 decimal, or 2 when some nonzero |value| is below `small` (so it does not show as 0.0)."""
    nz = np.abs(x[x != 0])
    return 2 if nz.size and nz.min() < small else 1


def number_format(kind: str, values: pd.Series) -> str | None:
    """The printf format (Streamlit NumberColumn dialect) of a column of `kind`, chosen from its values as
    shown ("percent" for SCALED kinds, whose values stay fractions); None for text and bool."""
    x = _finite(values)
    big = x.size and np.abs(x).max() >= 1000
    small = x.size and np.abs(x).min() < 1000
    if kind in ("ppl", "dppl"):
        sign = "+" if kind == "dppl" else ""
        return f"%{sign}.2f" if not big else f"%{sign},.0f" if not small else f"%{sign},.1f"
    if kind in SCALED:  # fractions shown as percent by Streamlit itself: the frame keeps its values (AppTests,
        return "percent"  # selections and the CSV read what the page computed)
    if kind == "pct":
        return f"%+.{_decimals(x, 0.1)}f%%"
    if kind == "count":
        return "%,d"
    if kind == "id":
        return "%d"
    if kind == "p":
        return "%.3g"
    if kind == "nats":
        return "%+.3f"
    if kind == "num":  # fixed decimals per column, by its largest magnitude; significant digits for tiny values
        nz = np.abs(x[x != 0])
        if nz.size and nz.max() < 0.01:
            return "%.3g"
        top = nz.max() if nz.size else 0.0
        return "%.3f" if top < 10 else "%.2f" if top < 1000 else "%,.0f"
    return None


def _group(col: str) -> str:
    """A column's format group: itself with any `_ci_lo` / `_ci_hi` removed (an estimate and its interval
    share one format, so 12.3% is not shown beside a bound of 9.87%)."""
    return re.sub(r"_ci_(lo|hi)(?= \[| \(|$)", "", str(col))


def display_frame(df: pd.DataFrame, labels: dict[str, str] | None = None,
                  keep: set[str] | frozenset[str] = frozenset()) -> tuple[pd.DataFrame, dict[str, dict | None]]:
    """(copy to show, {column: {'label', 'kind', 'format', 'help'} or None when hidden}) of a page's frame.
    `labels` overrides labels (e.g. {'bin': 'feature bin'}); columns in `keep` are left unscaled (a page
    gives them its own column config). Unknown columns keep their name as label (see `unlabelled`)."""
    shown = df.copy()
    config: dict[str, dict | None] = {}
    if not df.columns.is_unique:  # cannot address a column by name: show the frame as it is
        return shown, config
    for col in df.columns:
        if col in HIDDEN_BESIDE and HIDDEN_BESIDE[col] in df.columns:
            config[col] = None
            continue
        dtype = df[col].dtype
        numeric_label = pd.api.types.is_numeric_dtype(dtype) and col in NUMERIC_LABELS
        label, kind = NUMERIC_LABELS[col] if numeric_label else describe(col) or (str(col), "num")
        if pd.api.types.is_bool_dtype(dtype):
            kind = "bool"
        elif not pd.api.types.is_numeric_dtype(dtype):
            kind = "text"
        elif kind in ("text", "bool"):
            kind = "num"
        if kind == "text":
            shown[col] = df[col].astype(object).where(df[col].notna(), "")
        config[col] = {"label": (labels or {}).get(col, label), "kind": kind, "format": None,
                       "help": f"CSV column `{col}`"}
    numeric = [c for c, e in config.items() if e and e["kind"] not in ("text", "bool") and c not in keep]
    for group in dict.fromkeys(_group(c) for c in numeric):
        cols = [c for c in numeric if _group(c) == group]
        fmt = number_format(config[cols[0]]["kind"], pd.concat([shown[c] for c in cols], ignore_index=True))
        for c in cols:
            config[c]["format"] = fmt
    return shown, config


# --------------------------------------------------------------------------- what the table shows

_SPEC = re.compile(r"%(\+)?(,)?(?:\.(\d+))?([dfeg])")


def _js_number(r: float) -> str:
    """JavaScript's String(r): a plain decimal for 1e-6 <= |r| < 1e21 (and 0), else `1.5e-7` style."""
    if math.isinf(r):
        return "Infinity" if r > 0 else "-Infinity"
    if r == 0 or 1e-6 <= abs(r) < 1e21:
        return np.format_float_positional(r, trim="-")
    mantissa, exponent = f"{r:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{'+' if int(exponent) > 0 else '-'}{abs(int(exponent))}"


def render(fmt: str, value) -> str:
    """`value` formatted as Streamlit's NumberColumn shows it with printf format `fmt` (sprintf-js: flags
    `+` and `,`, precision, types d f e g; `%%` a literal percent); '' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if fmt == "percent":  # Intl.NumberFormat percent style, 0-2 fraction digits (Streamlit's formatNumber)
        return f"{float(value) * 100:,.2f}".rstrip("0").rstrip(".") + "%"
    m = _SPEC.search(fmt)
    sign, comma, prec, typ = m.groups()
    v = float(value)
    if math.isinf(v):
        body = _js_number(v)
    elif typ == "d":
        body = f"{int(v):{',' if comma else ''}d}"  # sprintf-js truncates (parseInt)
    elif typ == "f":
        body = f"{v:{',' if comma else ''}.{int(prec or 6)}f}"
    elif typ == "e":
        body = f"{v:.{int(prec or 6)}e}"
    else:  # g: String(Number(v.toPrecision(p)))
        body = _js_number(float(f"{v:.{int(prec or 6)}g}"))
    if sign and v >= 0 and not body.startswith("+"):
        body = "+" + body
    return (fmt[:m.start()] + body + fmt[m.end():]).replace("%%", "%")


def cell_texts(df: pd.DataFrame, col: str, labels: dict[str, str] | None = None) -> list[str]:
    """The texts the table shows in column `col` of a page's frame (what a reader sees)."""
    shown, config = display_frame(df, labels)
    entry = config[col]
    if entry is None:
        return []
    if entry["format"] is None:
        return [str(v) for v in shown[col]]
    return [render(entry["format"], v) for v in shown[col]]
