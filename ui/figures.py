"""Plotly figure builders of the dashboard (pure: return go.Figure, no streamlit import).

Frequency bins are drawn as ordered categorical labels from knnlm_core.bins (SPEC §3),
never re-binned by plotly; frequencies on continuous axes use log scales. A column with
SPEC §11 interval columns (`<col>_ci_lo`, `<col>_ci_hi`) is drawn with error bars.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

BIN_AXIS = "target frequency in datastore (bin)"
COLORS = {"lm": "#1f77b4", "knn": "#d62728", "knnlm": "#2ca02c", "b": "#9467bd"}


def error_bars(df: pd.DataFrame, col: str, scale: float = 1.0) -> dict | None:
    """Plotly error_y of a column's SPEC §11 interval (`<col>_ci_lo` / `<col>_ci_hi`), None without one.
    Bins without an interval (too few tokens or documents) get no bar."""
    lo, hi = f"{col}_ci_lo", f"{col}_ci_hi"
    if lo not in df or hi not in df:
        return None
    y = df[col].to_numpy(np.float64)
    return dict(type="data", symmetric=False, visible=True, thickness=1.2,
                array=np.nan_to_num(scale * (df[hi].to_numpy(np.float64) - y)).clip(min=0),
                arrayminus=np.nan_to_num(scale * (y - df[lo].to_numpy(np.float64))).clip(min=0))


def _bin_layout(fig: go.Figure, df: pd.DataFrame, title: str, ytitle: str, log_y: bool = False) -> go.Figure:
    """Ordered categorical bin x-axis, titles, compact margins."""
    fig.update_layout(
        title=title,
        xaxis_title=BIN_AXIS,
        yaxis_title=ytitle,
        barmode="group",
        margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="h", y=-0.25),
        height=380,
    )
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(df["bin"]))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def bin_bars(
    df: pd.DataFrame, cols: dict[str, str], title: str, ytitle: str, log_y: bool = False, percent: bool = False
) -> go.Figure:
    """Grouped bars per bin: one trace per column of `cols` ({column: legend name})."""
    fig = go.Figure()
    for col, name in cols.items():
        if col in df:
            fig.add_bar(x=df["bin"], y=df[col], name=name, error_y=error_bars(df, col),
                        hovertemplate="%{x}: %{y:.4g}<extra>" + name + "</extra>")
    if percent:
        fig.update_yaxes(tickformat=".0%")
    return _bin_layout(fig, df, title, ytitle, log_y)


def ppl_by_bin(df: pd.DataFrame, title: str = "Perplexity per frequency bin") -> go.Figure:
    """PPL under the LM and under kNN-LM per bin (log y)."""
    return bin_bars(df, {"ppl_lm": "LM", "ppl_knnlm": "kNN-LM"}, title, "perplexity", log_y=True)


def hits_by_bin(df: pd.DataFrame, ks: tuple[int, ...]) -> go.Figure:
    """hit@k per bin, one line per k."""
    fig = go.Figure()
    for k in ks:
        fig.add_scatter(x=df["bin"], y=df[f"hit_{k}"], mode="lines+markers", name=f"hit@{k}",
                        error_y=error_bars(df, f"hit_{k}"))
    fig.add_hline(y=0.5, line_dash="dot", line_color="grey")
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    return _bin_layout(fig, df, "Target among the first k neighbours (hit@k)", "share of tokens")


def lines_by_bin(df: pd.DataFrame, cols: dict[str, str], title: str, ytitle: str, log_y: bool = False) -> go.Figure:
    """One line per column over the ordered bins."""
    fig = go.Figure()
    for col, name in cols.items():
        if col in df:
            fig.add_scatter(x=df["bin"], y=df[col], mode="lines+markers", name=name, error_y=error_bars(df, col))
    return _bin_layout(fig, df, title, ytitle, log_y)


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
    """Box of each metric over the bin's types, with this type marked as a red diamond."""
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
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
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), title=None)
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
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def compare_bins(
    a: pd.DataFrame,
    b: pd.DataFrame,
    col: str,
    names: tuple[str, str],
    title: str,
    log_y: bool = False,
    percent: bool = False,
) -> go.Figure:
    """One metric per bin for two runs (grouped bars, union of bins in order)."""
    bins = pd.concat([a[["freq_bin", "bin"]], b[["freq_bin", "bin"]]]).drop_duplicates().sort_values("freq_bin")
    fig = go.Figure()
    for df, name, color in ((a, names[0], COLORS["lm"]), (b, names[1], COLORS["b"])):
        fig.add_bar(x=df["bin"], y=df[col], name=name, marker_color=color, error_y=error_bars(df, col))
    if percent:
        fig.update_yaxes(tickformat=".0%")
    return _bin_layout(fig, bins, title, col, log_y)


def variant_change_by_bin(compared: pd.DataFrame, names: dict[str, str] | None = None) -> go.Figure:
    """Relative PPL change vs plain (%) per bin, one line per variant of a knnlm_core.mitigations
    compare_to_plain table (plain itself left out); `names` maps variant -> legend name."""
    names = names or {}
    fig = go.Figure()
    for variant, df in compared[compared["variant"] != "plain"].groupby("variant", sort=False):
        name = names.get(variant, variant)
        fig.add_scatter(x=df["bin"], y=df["delta_ppl_pct"], mode="lines+markers", name=name,
                        error_y=error_bars(df, "delta_ppl_pct"),
                        hovertemplate="%{x}: %{y:+.2f}%<extra>" + name + "</extra>")
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    bins = compared[["freq_bin", "bin"]].drop_duplicates().sort_values("freq_bin")
    return _bin_layout(fig, bins, "PPL change vs plain kNN-LM per bin (below 0 = the variant helps)",
                       "Δ PPL vs plain (%)")


GAIN_SCALES = {"lower": "RdBu_r", "higher": "RdBu"}  # diverging scales centred at 0: blue where `better` is


def novelty_heatmap(cells: pd.DataFrame, col: str, title: str, fmt: str = ".1%", better: str = "") -> go.Figure:
    """Target-frequency bin (y) × context-match-length bin (x) heatmap of one column of
    queries.novelty_summary, each cell annotated with its value and token count; the hover adds its
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
                        hovertemplate="L_t %{x}: %{y:+.1%}<extra>" + name + "</extra>")
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_yaxes(tickformat="+.0%")
    fig.update_layout(title="PPL change vs the LM per context-match-length bin", xaxis_title="context match length "
                      "L_t (bin)", yaxis_title="PPL / PPL LM − 1", barmode="group", height=380,
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(by_ctx["L_t"]))
    return fig
