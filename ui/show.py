"""Streamlit table helper (issue 21 §6): a page's frame shown with reading labels and number formats
from ui.tables, missing values as empty cells, no index. The frame itself is unchanged, so the page's
CSV keeps the raw column names."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ui import tables


def config_for(df: pd.DataFrame, labels: dict[str, str] | None = None,
                  keep: set[str] | frozenset[str] = frozenset()) -> tuple[pd.DataFrame, dict]:
    """(copy to show, st.dataframe column_config) of a page's frame (see tables.display_frame)."""
    shown, config = tables.display_frame(df, labels, keep)
    out: dict = {}
    for col, c in config.items():
        if col in keep:
            continue
        if c is None:
            out[col] = None  # hidden
        elif c["kind"] == "bool":
            out[col] = st.column_config.CheckboxColumn(c["label"], help=c["help"])
        elif c["format"] is None:
            out[col] = st.column_config.TextColumn(c["label"], help=c["help"])
        else:
            out[col] = st.column_config.NumberColumn(c["label"], help=c["help"], format=c["format"])
    return shown, out


def table(df: pd.DataFrame, *, labels: dict[str, str] | None = None, column_config: dict | None = None,
          hide_index: bool = True, where=st, **kwargs):
    """st.dataframe of `df` for reading: labelled, formatted, empty cells for missing values, no index.
    `column_config` entries replace ours (their columns are left unscaled); `where` is a container
    (st, a column, the sidebar); other keyword arguments (key, on_select, selection_mode, height) pass
    through, and the return value is st.dataframe's (the selection event with on_select). A page switches
    with one edit: `st.dataframe(df, hide_index=True, ...)` -> `show.table(df, hide_index=True, ...)`."""
    own = dict(column_config or {})
    shown, config = config_for(df, labels, frozenset(own))
    return where.dataframe(shown, hide_index=hide_index, placeholder="", column_config={**config, **own}, **kwargs)
