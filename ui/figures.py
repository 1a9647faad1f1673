"""Plotly figure builders of the dashboard (pure: return go.Figure, no streamlit import).

Frequency bins are drawn as ordered categorical labels from knnlm_core.bins (SPEC §3),
never re-binned by plotly. Read like a paper's figures (issue 21 §6):
- a column with SPEC §11 interval columns (`<col>_ci_lo`, `<col>_ci_hi`) is drawn with error
  bars, and a point without an interval gets none (NaN in plotly's error array, never a
  zero-width cap that would look exact);
- the y axis is logarithmic only when the data span more than LOG_SPAN orders of magnitude
  (decided from the values, whatever a caller asks), so small differences are not exaggerated;
- legends sit in a horizontal row above the plot area, with a top margin sized for them, so
  they never cover an axis title; axis titles carry their units.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui import tables

BIN_AXIS = "target's frequency in the datastore (bin)"
COLORS = {"lm": "#1f77b4", "knn": "#d62728", "knnlm": "#2ca02c", "b": "#9467bd"}
LOG_SPAN = 1.5  # orders of magnitude (max / min of the positive values) above which a y axis is logarithmic
TITLE_PX, LEGEND_ROW_PX = 40, 24  # top margin: the title line, and each legend row above the plot area
LEGEND_WIDTH_PX = 420  # width assumed for a chart when counting legend rows (a half-width column)


def error_bars(df: pd.DataFrame, col: str, scale: float = 1.0) -> dict | None:
    """Plotly error_y of a column's SPEC §11 interval (`<col>_ci_lo` / `<col>_ci_hi`), None without one.
    A row without an interval (too few tokens or documents) is NaN in both arrays: plotly draws no bar there."""
    lo, hi = f"{col}_ci_lo", f"{col}_ci_hi"
    if lo not in df or hi not in df:
        return None
    y = df[col].to_numpy(np.float64)
    up = scale * (df[hi].to_numpy(np.float64) - y)
    down = scale * (y - df[lo].to_numpy(np.float64))
    missing = ~(np.isfinite(up) & np.isfinite(down))
    if missing.all():
        return None
    return dict(type="data", symmetric=False, visible=True, thickness=1.2,
                array=np.where(missing, np.nan, np.clip(up, 0, None)),
                arrayminus=np.where(missing, np.nan, np.clip(down, 0, None)))


def interval_text(df: pd.DataFrame, col: str, fmt: str = ".4g") -> list[str]:
    """Per row ' [lo, hi]' of a column's interval for hover labels, ' (no interval)' where it has none."""
    lo, hi = f"{col}_ci_lo", f"{col}_ci_hi"
    if lo not in df or hi not in df:
        return [""] * len(df)
    return [" (no interval)" if pd.isna(a) or pd.isna(b) else f" [{a:{fmt}}, {b:{fmt}}]"
            for a, b in zip(df[lo], df[hi], strict=True)]


def wants_log(values) -> bool:
    """Whether a y axis over `values` should be logarithmic: no finite value negative, and the positive
    ones spanning more than LOG_SPAN orders of magnitude (zeros, drawn as nothing either way, are ignored)."""
    x = np.asarray(pd.to_numeric(pd.Series(values, dtype=object), errors="coerce"), np.float64)
    x = x[np.isfinite(x)]
    if (x < 0).any():
        return False
    x = x[x > 0]
    return x.size >= 2 and math.log10(x.max() / x.min()) > LOG_SPAN


def _trace_y(fig: go.Figure) -> np.ndarray:
    """Every y value of the figure's traces (float64, NaN where not numeric)."""
    parts = [np.asarray(pd.to_numeric(pd.Series(list(t.y), dtype=object), errors="coerce"), np.float64)
             for t in fig.data if getattr(t, "y", None) is not None]
    return np.concatenate(parts) if parts else np.zeros(0)


def legend_above(fig: go.Figure, width_px: int = LEGEND_WIDTH_PX) -> go.Figure:
    """A horizontal legend in a row (or rows) just above the plot area and below the title, with the top
    margin grown to hold them (rows counted for a chart `width_px` wide): it can cover neither the plot
    nor an axis title."""
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    width = sum(40 + 7 * len(str(n)) for n in dict.fromkeys(names))
    rows = math.ceil(width / width_px) if names else 0
    margin = fig.layout.margin
    fig.update_layout(
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
        title=dict(yref="container", y=1, yanchor="top", pad=dict(t=12), x=0, xanchor="left"),
        margin=dict(l=margin.l if margin.l is not None else 10, r=margin.r if margin.r is not None else 10,
                    b=margin.b if margin.b is not None else 10, t=TITLE_PX + LEGEND_ROW_PX * rows + 8),
    )
    return fig


def _y_axis(fig: go.Figure, ytitle: str, percent: bool = False, log_y: bool | None = None) -> go.Figure:
    """y axis title with its unit, percent ticks, and a log scale only where the data call for one
    (`log_y=False` forbids it; True or None leave it to wants_log)."""
    log = log_y is not False and not percent and wants_log(_trace_y(fig))
    if percent and "%" not in ytitle:
        ytitle += " (%)"
    fig.update_yaxes(type="log" if log else "linear", title_text=ytitle + (" (log scale)" if log else ""))
    if log:  # decades as 10^k: SI prefixes would write a probability of 1e-4 as "100µ"
        fig.update_yaxes(exponentformat="power", dtick=1)
    if percent:
        fig.update_yaxes(tickformat=".1~%")
    return fig


def _bin_layout(fig: go.Figure, df: pd.DataFrame, title: str, ytitle: str, log_y: bool | None = None,
                percent: bool = False) -> go.Figure:
    """Ordered categorical bin x-axis, titles, y axis (see _y_axis), legend above the plot."""
    fig.update_layout(title=title, xaxis_title=BIN_AXIS, barmode="group", height=400,
                      margin=dict(l=10, r=10, b=10))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(df["bin"]))
    _y_axis(fig, ytitle, percent, log_y)
    return legend_above(fig)


def _hover(name: str, percent: bool, signed: bool = False) -> str:
    """Hover template: bin, value (with its interval from customdata), trace name."""
    fmt = ("+" if signed else "") + (".2%" if percent else ".4g")
    return "%{x}: %{y:" + fmt + "}%{customdata}<extra>" + name + "</extra>"


def bin_bars(
    df: pd.DataFrame, cols: dict[str, str], title: str, ytitle: str, log_y: bool | None = None,
    percent: bool = False
) -> go.Figure:
    """Grouped bars per bin: one trace per column of `cols` ({column: legend name}); the y axis is
    logarithmic only when the values span > LOG_SPAN orders of magnitude."""
    fig = go.Figure()
    for col, name in cols.items():
        if col in df:
            fig.add_bar(x=df["bin"], y=df[col], name=name, error_y=error_bars(df, col),
                        customdata=interval_text(df, col, ".2%" if percent else ".4g"),
                        hovertemplate=_hover(name, percent))
    return _bin_layout(fig, df, title, ytitle, log_y, percent)


def ppl_by_bin(df: pd.DataFrame, title: str = "Perplexity per frequency bin") -> go.Figure:
    """PPL under the LM and under kNN-LM per bin (log y when the bins span orders of magnitude)."""
    return bin_bars(df, {"ppl_lm": "LM", "ppl_knnlm": "kNN-LM"}, title, "perplexity (PPL)")


def hits_by_bin(df: pd.DataFrame, ks: tuple[int, ...]) -> go.Figure:
    """hit@k per bin, one line per k."""
    fig = go.Figure()
    for k in ks:
        fig.add_scatter(x=df["bin"], y=df[f"hit_{k}"], mode="lines+markers", name=f"hit@{k}",
                        error_y=error_bars(df, f"hit_{k}"), customdata=interval_text(df, f"hit_{k}", ".1%"),
                        hovertemplate=_hover(f"hit@{k}", True))
    fig.add_hline(y=0.5, line_dash="dot", line_color="grey")
    fig.update_yaxes(range=[0, 1.02])
    return _bin_layout(fig, df, "Target among the first k neighbours (hit@k)", "share of tokens", percent=True)


def lines_by_bin(df: pd.DataFrame, cols: dict[str, str], title: str, ytitle: str,
                 log_y: bool | None = None, percent: bool = False) -> go.Figure:
    """One line per column over the ordered bins."""
    fig = go.Figure()
    for col, name in cols.items():
        if col in df:
            fig.add_scatter(x=df["bin"], y=df[col], mode="lines+markers", name=name, error_y=error_bars(df, col),
                            customdata=interval_text(df, col, ".2%" if percent else ".4g"),
                            hovertemplate=_hover(name, percent))
    return _bin_layout(fig, df, title, ytitle, log_y, percent)


def exact_change_by_bin(df: pd.DataFrame) -> go.Figure:
    """Exact vs PQ (SPEC §8): per bin, kNN-LM's PPL with exact distances on the index's neighbours and with
    exact search, relative to the paper's IVFPQ + PQ setting on the same tokens (paired; error bars are the
    SPEC §11 intervals; below 0 = exact search lowers the PPL). The absolute PPLs stay in the table."""
    fig = go.Figure()
    for col, name, color in (("change_ivf_exact_vs_ivf_pq", "IVFPQ neighbours, exact distances", COLORS["lm"]),
                             ("change_exact_vs_ivf_pq", "exact search", COLORS["knn"])):
        if col in df:
            fig.add_bar(x=df["bin"], y=df[col], name=name, marker_color=color, error_y=error_bars(df, col),
                        customdata=interval_text(df, col, "+.2%"), hovertemplate=_hover(name, True, True))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    _bin_layout(fig, df, "Exact search vs IVFPQ + PQ: PPL change per bin", "PPL change vs IVFPQ + PQ",
                percent=True)
    return fig.update_yaxes(tickformat="+.1~%")


def pq_gain_scatter(types: pd.DataFrame, corr: dict) -> go.Figure:
    """Per type: pq_error_mean (x) vs mean gain (y), colour = log10 freq; r, n, p in the title."""
    t = types.dropna(subset=["pq_error_mean", "mean_gain"])
    fig = go.Figure(
        go.Scattergl(
            x=t["pq_error_mean"],
            y=t["mean_gain"],
            mode="markers",
            text=t["token"],
            marker=dict(
                size=5,
                opacity=0.6,
                color=np.log10(t["freq"].clip(lower=1)),
                colorscale="Viridis",
                colorbar=dict(title="log10 freq"),
            ),
            hovertemplate="%{text}<br>PQ error %{x:.3g}<br>mean gain %{y:.3f}<extra></extra>",
        )
    )
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(
        title=f"PQ error vs mean gain per type: r = {corr['r']:.3f}, n = {corr['n']:,}, p = {corr['p']:.2g}",
        xaxis_title="type's mean PQ error ||k − k̂||²",
        yaxis_title="mean gain (nats)",
        height=420,
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


def type_vs_bin(bin_types: pd.DataFrame, row: dict, metrics: tuple[str, ...]) -> go.Figure:
    """Box of each metric over the bin's types, with this type marked as a red diamond; subplot titles are
    the metrics' reading labels, the legend sits above them."""
    titles = [(tables.describe(m) or (m, ""))[0] for m in metrics]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=titles)
    for i, m in enumerate(metrics, start=1):
        fig.add_box(
            y=bin_types[m].dropna(),
            name="bin",
            boxpoints=False,
            showlegend=False,
            marker_color=COLORS["lm"],
            row=1,
            col=i,
        )
        if row.get(m) is not None and not pd.isna(row.get(m)):
            fig.add_scatter(
                x=["bin"],
                y=[row[m]],
                mode="markers",
                name="this type",
                showlegend=(i == 1),
                marker=dict(symbol="diamond", size=14, color=COLORS["knn"]),
                row=1,
                col=i,
            )
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=70, b=10), title=None,
                      legend=dict(orientation="h", yanchor="bottom", y=1.12, xanchor="left", x=0))
    return fig


def top_predictions(lm: pd.DataFrame, knn: pd.DataFrame, target: str) -> go.Figure:
    """LM top predictions beside the kNN top distribution (horizontal bars, target in red)."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("LM top predictions", "kNN top distribution"), horizontal_spacing=0.18
    )
    for col, (df, color) in enumerate(((lm, COLORS["lm"]), (knn, COLORS["b"])), start=1):
        labels = [repr(t) for t in df["token"]]
        colors = [COLORS["knn"] if t == target else color for t in df["token"]]
        fig.add_bar(x=df["p"], y=labels, orientation="h", marker_color=colors, showlegend=False, row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
        fig.update_xaxes(title_text="probability", row=1, col=col)
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def axis_title(col: str) -> str:
    """A column's reading label (ui.tables) as an axis title; _y_axis adds ' (%)' on percent axes."""
    return (tables.describe(col) or (col, ""))[0]


def compare_bins(
    a: pd.DataFrame,
    b: pd.DataFrame,
    col: str,
    names: tuple[str, str],
    title: str,
    log_y: bool | None = None,
    percent: bool = False,
) -> go.Figure:
    """One metric per bin for two runs (grouped bars, union of bins in order); y title from the column's label."""
    bins = pd.concat([a[["freq_bin", "bin"]], b[["freq_bin", "bin"]]]).drop_duplicates().sort_values("freq_bin")
    fig = go.Figure()
    for df, name, color in ((a, names[0], COLORS["lm"]), (b, names[1], COLORS["b"])):
        fig.add_bar(x=df["bin"], y=df[col], name=name, marker_color=color, error_y=error_bars(df, col),
                    customdata=interval_text(df, col, ".2%" if percent else ".4g"),
                    hovertemplate=_hover(name, percent))
    return _bin_layout(fig, bins, title, axis_title(col), log_y, percent)


def variant_change_by_bin(compared: pd.DataFrame, names: dict[str, str] | None = None) -> go.Figure:
    """Relative PPL change vs plain (%) per bin, one line per variant of a knnlm_core.mitigations
    compare_to_plain table (plain itself left out); `names` maps variant -> legend name."""
    names = names or {}
    fig = go.Figure()
    for variant, df in compared[compared["variant"] != "plain"].groupby("variant", sort=False):
        name = names.get(variant, variant)
        fig.add_scatter(x=df["bin"], y=df["delta_ppl_pct"], mode="lines+markers", name=name,
                        error_y=error_bars(df, "delta_ppl_pct"),
                        customdata=interval_text(df, "delta_ppl_pct", "+.1f"),
                        hovertemplate="%{x}: %{y:+.2f}%%{customdata}<extra>" + name + "</extra>")
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    bins = compared[["freq_bin", "bin"]].drop_duplicates().sort_values("freq_bin")
    fig = _bin_layout(fig, bins, "PPL change vs plain kNN-LM per bin (below 0 = the variant helps)",
                      "PPL change vs plain kNN-LM (%)", log_y=False)
    return legend_above(fig, 2 * LEGEND_WIDTH_PX).update_yaxes(ticksuffix="%")  # drawn full width


GAIN_SCALES = {"lower": "RdBu_r", "higher": "RdBu"}  # diverging scales centred at 0: blue where `better` is


def novelty_heatmap(cells: pd.DataFrame, col: str, title: str, fmt: str = ".1%", better: str = "") -> go.Figure:
    """Target-frequency bin (y) × context-match-length bin (x) heatmap of one column of
    read.novelty.novelty_summary, each cell annotated with its value and token count; the hover adds its
    SPEC §11 interval. `better` ('lower' for a PPL change, 'higher' for a share of the gain): a red-blue
    scale centred at 0, blue on the better side, a cell whose interval excludes 0 starred; '' = sequential."""
    x = cells.drop_duplicates("ctx_bin").sort_values("ctx_bin")["L_t"].tolist()
    y = cells.drop_duplicates("freq_bin").sort_values("freq_bin")["bin"].tolist()
    grid = cells.set_index(["bin", "L_t"])

    def at(c: str, default=np.nan) -> list[list]:
        return [[grid[c].get((b, lt), default) if c in grid else default for lt in x] for b in y]

    z, n = at(col), at("n_tokens", 0)
    lo, hi = at(f"{col}_ci_lo"), at(f"{col}_ci_hi")
    # a change whose interval excludes 0 is starred
    star = [["*" if better and (a > 0 or b < 0) else "" for a, b in zip(lr, hr)] for lr, hr in zip(lo, hi)]
    text = [[("" if pd.isna(v) else format(v, fmt)) + s + f"<br>n={int(c):,}" if c else ""
             for v, c, s in zip(zr, nr, sr)] for zr, nr, sr in zip(z, n, star)]
    ci = [[("no interval" if pd.isna(a) or pd.isna(b) else f"[{format(a, fmt)}, {format(b, fmt)}]")
           for a, b in zip(lr, hr)] for lr, hr in zip(lo, hi)]
    scale = dict(colorscale=GAIN_SCALES[better], zmid=0) if better else dict(colorscale="Viridis")
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=y, text=text, texttemplate="%{text}", customdata=ci, **scale,
        hovertemplate="freq %{y} · L_t %{x}<br>" + col + " %{z:" + fmt + "} %{customdata}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="context match length L_t (bin)", yaxis_title=BIN_AXIS, height=460,
                      margin=dict(l=10, r=10, t=50, b=10))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=x)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=y)
    return fig


def novelty_by_ctx(by_ctx: pd.DataFrame) -> go.Figure:
    """PPL change vs the LM per context-match-length bin: kNN-LM and, when the run has it, the ∞-gram
    interpolation (bars with their SPEC §11 intervals; below 0 = lower perplexity than the LM)."""
    fig = go.Figure()
    for col, name, color in (("ppl_change", "kNN-LM", COLORS["knnlm"]), ("infgram_change", "∞-gram interpolation",
                                                                          COLORS["b"])):
        if col in by_ctx:
            fig.add_bar(x=by_ctx["L_t"], y=by_ctx[col], name=name, marker_color=color, error_y=error_bars(by_ctx, col),
                        customdata=interval_text(by_ctx, col, "+.1%"),
                        hovertemplate="L_t %{x}: %{y:+.1%}%{customdata}<extra>" + name + "</extra>")
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title="PPL change vs the LM per context-match-length bin",
                      xaxis_title="context match length L_t (tokens, bin)", barmode="group", height=400,
                      margin=dict(l=10, r=10, b=10))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(by_ctx["L_t"]))
    _y_axis(fig, "PPL change vs the LM", percent=True)
    fig.update_yaxes(tickformat="+.1~%")
    return legend_above(fig)
