"""Streamlit widget builders shared by the pages: run picker, run card, bin range, CSV.

URL-bound widgets use `bind="query-params"` with key = parameter name (ui.params); their URL
values are read with the ui.params parsers through `url_param` / `settle`. Every failure ends in a
clear st.error / st.info and st.stop(), never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import NoReturn, TypeVar

import pandas as pd
import streamlit as st

from knnlm_core import store
from knnlm_core.bins import bin_label
from ui import cache
from ui.params import Parsed, default_run, list_runs, parse_choice, parse_range, runs_root

T = TypeVar("T")
_FIXES = "_url_fixes"  # session-state key: {param: (value, note)} that settle() staged for the next run
_APPLIED = "_url_fixes_applied"  # session-state key: params whose staged value url_param() applied this run


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
    default = default_run(runs)
    parsed = url_param("run", lambda raw: parse_choice("run", raw, runs, default))
    run = st.sidebar.selectbox(
        "Run",
        runs,
        index=runs.index(default),
        key="run",
        bind="query-params",
        help=f"Runs found under {runs_root()}",
    )
    return settle("run", parsed, run)


def open_run(run: str) -> dict:
    """The run's `run` row; a clear error (old schema, unreadable file) stops the page."""
    try:
        return cache.run_info(run)
    except store.RunSchemaError as err:
        fail(f"Cannot open run `{run}`: {err}")


# True while app.py runs the page of this script run (set per run, per session: a ContextVar
# lives in the script thread's context, unlike a flag on a class shared by every session).
_VIA_APP: ContextVar[bool] = ContextVar("knnlm_via_app", default=False)


@contextmanager
def navigated() -> Iterator[None]:
    """app.py runs its page inside this: the page then knows it came through st.navigation."""
    token = _VIA_APP.set(True)
    try:
        yield
    finally:
        _VIA_APP.reset(token)


def ensure_navigation() -> None:
    """Rerun this session through app.py when Streamlit ran the page script directly.

    With a pages/ directory beside app.py, Streamlit 1.67 starts in pages/-directory mode (a
    class flag, PagesManager.uses_pages_directory) and runs a deep link such as /neighbors as
    pages/neighbors.py alone, until some session's app.py calls st.navigation. Sessions that
    start together on a fresh server all run that way, so each must notice it by itself: a page
    run outside `navigated()` turns the mode off (for the whole process) and reruns, which now
    runs app.py (run picker, run card) and then this page.
    """
    if _VIA_APP.get():
        return
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is None or Path(ctx.pages_manager.main_script_path).name != "app.py":
        fail("Start the dashboard with `streamlit run app.py`: the pages need its navigation and run picker.")
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
    def parse(raw: list[str]) -> Parsed[tuple[int, int]]:
        got = parse_range("bin", raw, [bin_label(b) for b in bins])  # indices into bins
        return Parsed((bins[got.value[0]], bins[got.value[1]]), got.note)

    parsed = url_param("bin", parse)
    lo, hi = st.select_slider(
        "Frequency bins",
        options=bins,
        value=(bins[0], bins[-1]),
        format_func=bin_label,
        key="bin",
        bind="query-params",
    )
    lo, hi = settle("bin", parsed, (lo, hi))
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


def url_param(name: str, parse: Callable[[list[str]], Parsed[T]]) -> Parsed[T]:
    """URL parameter `name` read with its ui.params parser; when its value was replaced, one
    st.warning line says what is used instead. Call it before the widget bound to `name`."""
    fixes = st.session_state.get(_FIXES, {})
    if name in fixes:  # staged by settle() in the previous run: the widget shows it now
        value, note = fixes.pop(name)
        st.session_state[name] = value
        st.session_state.setdefault(_APPLIED, set()).add(name)
        parsed = Parsed(value, note)
    else:
        parsed = parse(st.query_params.get_all(name))
    if parsed.note:
        st.warning(parsed.note, icon=":material/link_off:")
    return parsed


def settle(name: str, parsed: Parsed[T], value: T) -> T:
    """`value` of the widget bound to `name` (created after url_param), made to agree with the parser.

    Streamlit seeds bound widgets from the URL with its own, laxer parsing ('3.5' -> 3, '1e1',
    '٣', the last of repeated values). When the parser replaced the URL value and the widget
    took another one, stage the parser's value for the widget and rerun once (a widget's
    session-state value can only be set before the widget exists in a run).
    """
    applied = st.session_state.get(_APPLIED, set())
    if name in applied:  # this run already carries the fix: never rerun twice for one value
        applied.discard(name)
        return parsed.value
    if parsed.note is None or value == parsed.value:
        return value
    st.session_state.setdefault(_FIXES, {})[name] = (parsed.value, parsed.note)
    st.rerun()
