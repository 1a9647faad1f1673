"""kNN-LM long-tail diagnostics dashboard (Nishida et al. 2025): `streamlit run app.py`.

Registers every page with st.navigation (first call), draws the run picker and the
shared run card in the sidebar, then runs the page. Runs are read from $KNNLM_RUNS_DIR
(default data/runs); see docs/DASHBOARD.md.

The navigation is drawn at the top of the page: with a pages/ folder beside this file, Streamlit
starts every fresh server in folder mode and lists the raw file names in the sidebar until this
script's st.navigation has run; .streamlit/config.toml hides that sidebar list
(client.showSidebarNavigation = false, which also hides any sidebar-position navigation).
The Overview is the default page, served at `/`; `/overview` (the documented link) redirects there
with its query parameters.
"""

import logging

import streamlit as st

from knnlm_core import store
from ui import widgets
from ui.render import md_code

PAGES = [
    st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", url_path="home", default=True),
    st.Page("pages/bins.py", title="Frequency bins", icon=":material/bar_chart:", url_path="bins"),
    st.Page("pages/novelty.py", title="Context novelty", icon=":material/grid_on:", url_path="novelty"),
    st.Page("pages/tokens.py", title="Token explorer", icon=":material/search:", url_path="tokens"),
    st.Page("pages/neighbors.py", title="Neighbour inspector", icon=":material/hub:", url_path="neighbors"),
    st.Page("pages/exact.py", title="Exact vs PQ", icon=":material/compare:", url_path="exact"),
    st.Page("pages/whatif.py", title="What-if", icon=":material/tune:", url_path="whatif"),
    st.Page("pages/mitigations.py", title="Mitigations", icon=":material/healing:", url_path="mitigations"),
    st.Page("pages/compare.py", title="Compare runs", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("pages/probe.py", title="Probe", icon=":material/edit_note:", url_path="probe"),
]


def _to_overview() -> None:
    """/overview: the Overview is the default page, served at `/`; go there, keeping every query parameter."""
    st.switch_page(PAGES[0], query_params={k: st.query_params.get_all(k) for k in st.query_params})  # repeats kept


OVERVIEW_LINK = st.Page(_to_overview, title="Overview", url_path="overview", visibility="hidden")

page = st.navigation([*PAGES, OVERVIEW_LINK], position="top")
if page is OVERVIEW_LINK:
    page.run()
st.set_page_config(page_title="kNN-LM long tail", page_icon=":material/query_stats:", layout="wide")

run = widgets.run_picker()
widgets.run_card(widgets.open_run(run))

try:
    with widgets.navigated():  # the page knows it runs through this navigation (widgets.ensure_navigation)
        page.run()
except Exception as err:  # st.stop / st.rerun / switch_page are BaseException and pass through
    if store.is_corruption(err):  # a garbled run file is bad input: one line naming it and the fix
        st.error(widgets.garbled(run, err))
        st.stop()
    logging.getLogger("knnlm.app").exception("page %s failed", page.title)
    first = str(err).splitlines()[0] if str(err) else ""
    st.error(f"This page could not be drawn: {type(err).__name__}: {md_code(first[:200])}")  # may quote user text
