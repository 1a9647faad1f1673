"""Streamlit widget builders shared by the pages: run picker, run card, bin range, CSV, copy link.

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

import duckdb
import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitAPIException

from knnlm_core import store
from knnlm_core.bins import bin_label
from ui import cache, links
from ui.params import Parsed, default_run, list_runs, parse_choice, parse_range, runs_root
from ui.render import md_code

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
    """The run's `run` row; a clear error (old schema, unreadable or garbled file) stops the page."""
    try:
        return cache.run_info(run)
    except store.CorruptRunError as err:
        fail(garbled_line(run, err))
    except store.RunSchemaError as err:
        fail(f"Cannot open run `{run}`: {err}")
    except duckdb.Error as err:
        if not store.is_corruption(err):
            raise
        fail(garbled(run, err))


def garbled_line(run: str, err: BaseException) -> str:
    """One line: run `run`'s database is garbled (DuckDB's reason), and the command that rebuilds it."""
    path = cache.db_path(run)
    cause = err.__cause__ if isinstance(err, store.CorruptRunError) and err.__cause__ else err
    reason = " ".join(str(cause).split())[:200]
    fix = f"python -m precompute --config … --run-dir {path.parent} --overwrite"
    return (f"Cannot read run {md_code(run)}: its database {md_code(str(path))} is garbled ({md_code(reason)}). "
            f"Rebuild it with {md_code(fix)}; other runs can still be picked in the sidebar.")


def garbled(run: str, err: BaseException) -> str:
    """garbled_line for a DuckDB damage error met while drawing run `run`'s page.

    The error does not say which file it read and a page may read two runs (Compare), so the run files
    are read once more, this run's first (store.check_file, on this error path only), to name the garbled one.
    """
    for name in [run] + [r for r in list_runs() if r != run]:
        try:
            store.check_file(cache.db_path(name))
        except store.CorruptRunError as found:
            return garbled_line(name, found)
    return garbled_line(run, err)


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


_FOLLOW = "_follow_link"  # session-state key: (page, query params) a chart click staged (stage_link) for this run


def stage_link(page: str, state: dict[str, object], params: dict[str, str | list[str]] | None = None) -> None:
    """From a widget callback: give the URL-bound widgets `state` ({key: value}) and open `page` with query
    parameters `params` at the start of the next script run (follow_link). st.switch_page cannot set a
    parameter bound to a widget of the page it leaves (`bin` on the bins page), but a callback runs before any
    widget exists, so it may set their session-state values, which the new page's widgets then show."""
    for key, value in state.items():
        st.session_state[key] = value
    st.session_state[_FOLLOW] = (page, params or {})


def follow_link() -> None:
    """Open the page a callback staged (stage_link) with its query parameters, or with none when one of them is
    bound to a widget here (the bound widgets then write theirs from session state on the new page)."""
    staged = st.session_state.pop(_FOLLOW, None)
    if staged is None:
        return
    page, params = staged
    try:
        st.switch_page(page, query_params=params)
    except StreamlitAPIException:  # "cannot directly set query parameter ... bound to a widget"
        st.switch_page(page, query_params={})


def current_run() -> tuple[str, dict]:
    """(run name, run row) chosen in the sidebar for this script run; first follows a staged link."""
    ensure_navigation()
    follow_link()
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
    import json  # the run's config (config_json) says whether its datastore was imported (docs/IMPORT.md)

    try:
        imported = json.loads(info.get("config_json") or "{}").get("import_datastore", "")
    except (TypeError, ValueError, AttributeError):
        imported = ""
    if imported:
        where.markdown(f"datastore **imported** from {md_code(str(imported))}: checked against the model and the "
                       "datastore text, its keys (and index) read where they lie")


def bin_range(bins: list[int]) -> tuple[int, int]:
    """Select-slider over the run's bins (key/URL param `bin`), returns (low, high)."""
    if len(bins) == 1:
        return bins[0], bins[0]
    def parse(raw: list[str]) -> Parsed[tuple[int, int]]:
        got = parse_range("bin", raw, [bin_label(b) for b in bins])  # indices into bins
        return Parsed((bins[got.value[0]], bins[got.value[1]]), got.note)

    parsed = url_param("bin", parse)
    one_label = len(st.query_params.get_all("bin")) == 1  # read before the slider: its binding drops that URL value
    lo, hi = st.select_slider(
        "Frequency bins",
        options=bins,
        value=(bins[0], bins[-1]),
        format_func=bin_label,
        key="bin",
        bind="query-params",
    )
    # One label (`?bin=10–99`, the form the charts link with) means that bin alone; Streamlit's own binding
    # of a range slider needs two values and ignores it, so the parser's value is staged even without a note.
    lo, hi = settle("bin", parsed, (lo, hi), force=one_label)
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


def settle(name: str, parsed: Parsed[T], value: T, force: bool = False) -> T:
    """`value` of the widget bound to `name` (created after url_param), made to agree with the parser.

    Streamlit seeds bound widgets from the URL with its own, laxer parsing ('3.5' -> 3, '1e1',
    '٣', the last of repeated values). When the parser replaced the URL value and the widget
    took another one, stage the parser's value for the widget and rerun once (a widget's
    session-state value can only be set before the widget exists in a run). `force`: also when the
    parser took the URL's value (no note) but Streamlit's binding did not.
    """
    applied = st.session_state.get(_APPLIED, set())
    if name in applied:  # this run already carries the fix: never rerun twice for one value
        applied.discard(name)
        return parsed.value
    if (parsed.note is None and not force) or value == parsed.value:
        return value
    st.session_state.setdefault(_FIXES, {})[name] = (parsed.value, parsed.note)
    st.rerun()


def copy_link(url_path: str, **state: str | int | list[str] | None) -> None:
    """Sidebar "copy link": the relative URL of this view in st.code, whose copy button copies it (issue 24
    item 4). The URL's query parameters, with `state` ({param: value the page uses, None: none}) laid over
    them: a bound widget's value reaches st.query_params only on the next run, and its default never does."""
    params: dict[str, list[str]] = {"run": [str(st.session_state.get("run", ""))]}
    params.update({k: st.query_params.get_all(k) for k in st.query_params})
    for name, value in state.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    with st.sidebar:
        st.caption("Link to this view (append it to the dashboard's address):")
        st.code(links.view_url(url_path, params), language=None, wrap_lines=True)
