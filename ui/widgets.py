"""Streamlit widget builders shared by the pages: run picker, run card, bin range, CSV.

URL-bound widgets use `bind="query-params"` with key = parameter name (ui.params).
Every failure ends in a clear st.error / st.info and st.stop(), never a traceback.
"""

from __future__ import annotations

from typing import NoReturn

import pandas as pd
import streamlit as st

from knnlm_core import store
from knnlm_core.bins import bin_label
from ui import cache
from ui.params import default_run, list_runs, runs_root


def fail(message: str, info: bool = False) -> NoReturn:
    """Show a clear message and end this script run."""
    (st.info if info else st.error)(message)
    st.stop()


def run_picker() -> str:
    """Sidebar selectbox over the runs under the runs root (key/URL param `run`)."""
    runs = list_runs()
    if not runs:
        fail(
            f"No run found under `{runs_root()}` (a run is a directory holding metrics.duckdb). Build one with "
            "`python -m precompute --config configs/<preset>.toml --run-dir data/runs/demo`, "
            "or point KNNLM_RUNS_DIR at a directory of runs.",
            info=True,
        )
    raw = st.query_params.get("run")
    run = st.sidebar.selectbox(
        "Run",
        runs,
        index=runs.index(default_run(runs)),
        key="run",
        bind="query-params",
        help=f"Runs found under {runs_root()}",
    )
    if raw is not None and raw not in runs:
        fail(f"Run `{raw}` not found under `{runs_root()}`. Available runs: {', '.join(runs)}.")
    return run


def open_run(run: str) -> dict:
    """The run's `run` row; a clear error (old schema, unreadable file) stops the page."""
    try:
        return cache.run_info(run)
    except store.RunSchemaError as err:
        fail(f"Cannot open run `{run}`: {err}")


def ensure_navigation() -> None:
    """Make a deep link on a fresh server go through app.py.

    Streamlit starts in pages/-directory mode (MPA v1) until app.py's st.navigation has
    run once in the process; until then a URL such as /neighbors runs pages/neighbors.py
    without app.py. Leave that mode (a class flag, Streamlit 1.67) and rerun via app.py.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()


def current_run() -> tuple[str, dict]:
    """(run name, run row) chosen in the sidebar for this script run."""
    ensure_navigation()
    run = st.session_state.get("run")
    if run is None:
        fail("No run selected.", info=True)
    return run, open_run(run)


DOMAINS = {
    "in-domain": "in-domain: the evaluation text comes from the distribution the LM was trained on and the "
    "datastore was built from",
    "out-of-domain": "out-of-domain: the evaluation text comes from another distribution than the LM's training "
    "data and the datastore",
}


def setting(info: dict) -> str:
    """The run's evaluation setting in words (config eval_domain)."""
    return DOMAINS.get(info.get("eval_domain") or "", "setting not stated (set eval_domain in the run's config)")


def run_card(info: dict, where=None) -> None:
    """Compact description of a run (model, sizes, index, k, τ, λ) in `where` (default: sidebar)."""
    where = st.sidebar if where is None else where
    k, stored = info.get("k"), info.get("store_neighbors")
    where.markdown(
        f"**{info.get('run_name', '?')}** · `{info.get('model', '?')}`  \n"
        f"N = {info.get('n_entries', 0):,} entries · eval {info.get('n_eval', 0):,} tokens "
        f"({info.get('eval_domain') or 'domain not stated'})  \n"
        f"index `{info.get('index_factory')}` · nprobe {info.get('nprobe')}  \n"
        f"k = {k} (stored {stored}) · τ = {info.get('temperature')} · λ = {info.get('lambda')}  \n"
        f"distances: {info.get('distance_source')} · PPL {info.get('ppl_lm', 0):.2f} → {info.get('ppl_knnlm', 0):.2f}"
    )


def bin_range(bins: list[int]) -> tuple[int, int]:
    """Select-slider over the run's bins (key/URL param `bin`), returns (low, high)."""
    if len(bins) == 1:
        return bins[0], bins[0]
    lo, hi = st.select_slider(
        "Frequency bins",
        options=bins,
        value=(bins[0], bins[-1]),
        format_func=bin_label,
        key="bin",
        bind="query-params",
    )
    return int(lo), int(hi)


def csv_button(df: pd.DataFrame, name: str, label: str = "Download CSV") -> None:
    """Download button that builds the CSV only when clicked."""
    st.download_button(
        label,
        data=lambda: df.to_csv(index=False),
        file_name=f"{name}.csv",
        mime="text/csv",
        on_click="ignore",
        key=f"csv_{name}",
        icon=":material/download:",
    )


def page_param_int(name: str, low: int, high: int) -> int | None:
    """Integer URL parameter `name` validated against [low, high]; a bad value stops the page."""
    raw = st.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        fail(f"`?{name}={raw}` is not an integer.")
    if not low <= value <= high:
        fail(f"`?{name}={value}` is out of range: this run has positions {low}…{high:,}.")
    return value
