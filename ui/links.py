"""Linked views (issue 24 item 4): where a click on a chart or a row of a table leads, as plain
query-parameter dicts for st.switch_page, and the shareable relative URL of a view. Pure: no
streamlit import, so the mapping "selection -> target URL" is unit-testable without a browser.

Plotly heatmaps have no point selection: `clickable_cells` lays an invisible marker on each cell.

A Streamlit plotly selection event (`st.plotly_chart(..., on_select="rerun")`) is a mapping
`{"selection": {"points": [{"x": ..., "y": ..., "curve_number": ..., "point_index": ...}, ...]}}`;
a dataframe selection event `{"selection": {"rows": [i, ...]}}`.

Streamlit 1.67 refuses `st.switch_page(..., query_params=...)` for a parameter bound to a widget that
exists in the session (`run` always, `bin` on the bins page): the pages pass only unbound parameters and
set bound ones through session state (ui.widgets.stage_link).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlencode

import plotly.graph_objects as go

TOKENS_PAGE = "pages/tokens.py"  # the Token explorer: a bin bar opens it filtered to that bin (`?bin=`)
NEIGHBORS_PAGE = "pages/neighbors.py"  # the Neighbour inspector: a token row opens it at that position (`?pos=`)


def _get(obj, name: str, default=None):
    """obj[name] or obj.name (Streamlit's event states support both), else `default`."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def selected_points(event) -> list[dict]:
    """The selected points of a plotly selection event ([] for None, no selection or another event)."""
    points = _get(_get(event, "selection"), "points", None) or []
    return [p for p in points if isinstance(p, Mapping)]


def selected_rows(event) -> list[int]:
    """The selected row indices of a dataframe selection event ([] for None or no selection)."""
    rows = _get(_get(event, "selection"), "rows", None) or []
    return [int(r) for r in rows]


def bin_target(event, labels: Sequence[str], axis: str = "x") -> str | None:
    """The frequency-bin label of the first selected point whose `axis` value is one of `labels` (a bar
    of a per-bin chart: axis 'x'; a heatmap cell: 'y'); None when nothing, or nothing that is a bin, is
    selected. The Token explorer opens filtered to it (`?bin=<label>`)."""
    for point in selected_points(event):
        label = point.get(axis)
        if isinstance(label, str) and label in labels:
            return label
    return None


def row_target(event, positions: Sequence[int]) -> int | None:
    """The evaluation position of the first selected row of a table whose positions are `positions` (in
    row order); None without a valid selection. The Neighbour inspector opens there (`?pos=<position>`)."""
    for row in selected_rows(event):
        if 0 <= row < len(positions):
            return int(positions[row])
    return None


def view_url(url_path: str, params: Mapping[str, Sequence[str] | str]) -> str:
    """Relative URL of a view: `/<url_path>?<params>` (repeated values kept, in order; no `?` without
    params). Values are percent-encoded, so any text in them stays part of its own parameter."""
    pairs = [(k, v) for k, vals in params.items() for v in ([vals] if isinstance(vals, str) else vals)]
    query = urlencode(pairs)
    return f"/{url_path.strip('/')}" + (f"?{query}" if query else "")


def clickable_cells(fig: go.Figure, hint: str) -> go.Figure:
    """`fig`, a heatmap over categories (its first trace), with an invisible marker at the centre of every cell
    that takes over the cell's hover text (plus `hint`): a click anywhere in a cell selects its marker (the
    nearest: hoverdistance -1), whose point carries the cell's x and y. Plotly heatmaps have no selection."""
    heat = fig.data[0]
    x, y = list(heat.x), list(heat.y)
    z = [[None] * len(x) for _ in y] if heat.z is None else heat.z
    extra = [[None] * len(x) for _ in y] if heat.customdata is None else heat.customdata
    cells = [(a, b, z[i][j], extra[i][j]) for i, b in enumerate(y) for j, a in enumerate(x)]  # row-major
    template = (heat.hovertemplate or "%{y} · %{x}").replace("%{customdata}", "%{customdata[1]}")
    template = template.replace("%{z", "%{customdata[0]").replace("<extra></extra>", "")
    fig.update_traces(hoverinfo="skip", hovertemplate=None, selector=dict(type="heatmap"))
    fig.add_scatter(x=[c[0] for c in cells], y=[c[1] for c in cells], customdata=[[c[2], c[3]] for c in cells],
                    mode="markers", showlegend=False, name="", marker=dict(size=30, color="rgba(0,0,0,0)"),
                    selected=dict(marker=dict(opacity=0)), unselected=dict(marker=dict(opacity=0)),
                    hovertemplate=template + "<br>" + hint + "<extra></extra>")
    fig.update_layout(hoverdistance=-1, hovermode="closest")
    return fig
