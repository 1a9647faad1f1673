"""Linked views (issue 24 item 4) on the shipped demo run: a bin of the Frequency bins / Context novelty
charts opens the Token explorer filtered to it, a token row opens the Neighbour inspector at its position,
the inspector shows a chosen neighbour's datastore entry, and every view's "copy link" gives its URL.

AppTest cannot click a plotly bar or a dataframe row, so the mapping "selection -> target" (ui.links) is
tested on events shaped as Streamlit 1.67 delivers them (recorded from a real browser), and the pages are
tested at their targets' URLs and through the staged link a chart callback leaves (ui.widgets.stage_link);
tests/test_e2e_browser.py clicks a real bar. Every table is checked against a recomputation with pandas
over the run's own tables."""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest
from conftest import PAGE_TITLES, app_on
from streamlit.testing.v1 import AppTest

from knnlm_core import read, store
from knnlm_core.bins import bin_label
from ui import figures, links

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "data" / "runs"
APP = str(REPO / "app.py")
DEMO = SHIPPED / "demo"

# A bar click as Streamlit 1.67 returned it on the bins page's PPL chart (trace LM, bin 10–99).
BAR_EVENT = {"selection": {"points": [{
    "curve_number": 0, "point_number": 2, "point_index": 2, "x": "10–99", "y": 10459.175647039061,
    "label": "10–99", "value": 10459.175647039061, "customdata": " [8621, 1.43e+04]",
    "error_y_array": 3841.077975553919, "error_y_arrayminus": 1838.0522840454287}],
    "point_indices": [2], "box": [], "lasso": []}}


@pytest.fixture
def demo_env(monkeypatch):
    """The app on the shipped runs (data/runs), with empty streamlit caches."""
    if not (DEMO / store.DB_NAME).exists():
        pytest.skip("shipped demo run not present")
    yield from app_on(SHIPPED, monkeypatch)


def _sql(sql: str, params: list | None = None) -> pd.DataFrame:
    con = store.open_readonly(DEMO / store.DB_NAME)
    try:
        return con.execute(sql, params or []).df()
    finally:
        con.close()


def _open(page: str, **params) -> AppTest:
    """app.py on run demo, switched to pages/<page>.py with URL parameters (a list value: repeated)."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = "demo"
    at.run()
    at.switch_page(f"pages/{page}.py")
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.title[0].value == PAGE_TITLES[page]
    return at


def _link(at: AppTest) -> tuple[str, dict[str, list[str]]]:
    """(path, query) of the sidebar's copy-link box."""
    url = urlsplit(at.sidebar.code[0].value)
    return url.path, parse_qs(url.query)


def _bin_types_reference(freq_bin: int) -> pd.DataFrame:
    """The evaluation targets' types of one bin, most targets first (then lowest id), from eval_tokens alone."""
    ev = _sql("SELECT token_id, freq_bin, gain FROM eval_tokens")
    one = ev[ev["freq_bin"] == freq_bin].groupby("token_id").agg(n_eval=("gain", "size"), mean_gain=("gain", "mean"))
    return one.reset_index().sort_values(["n_eval", "token_id"], ascending=[False, True]).reset_index(drop=True)


# --------------------------------------------------------------------------- ui.links (pure)


def test_bin_target_reads_the_clicked_bin():
    labels = [bin_label(b) for b in range(-1, 6)]
    assert links.bin_target(BAR_EVENT, labels) == "10–99"
    heat = {"selection": {"points": [{"curve_number": 1, "x": "2–3", "y": "100–999"}]}}
    assert links.bin_target(heat, labels, axis="y") == "100–999"
    assert links.bin_target(heat, labels) is None  # "2–3" is an L_t bin, not a frequency bin
    hostile = {"selection": {"points": [{"x": "<b>10–99</b>"}, {"x": 3}, "x"]}}
    for event in (None, {}, {"selection": {"points": []}}, hostile):
        assert links.bin_target(event, labels) is None


def test_row_target_maps_a_row_to_its_position():
    positions = [35, 70, 91]
    assert links.row_target({"selection": {"rows": [1]}}, positions) == 70
    for event in (None, {"selection": {"rows": []}}, {"selection": {"rows": [3]}}, {"selection": {"rows": [-1]}}):
        assert links.row_target(event, positions) is None


def test_view_url_keeps_every_value_literal():
    params = {"run": "demo", "token": "a&b=c#d ?\u202eé", "bin": ["1–9", "100–999"]}
    url = links.view_url("tokens", params)
    got = urlsplit(url)
    assert got.path == "/tokens" and not got.fragment
    assert parse_qs(got.query) == {"run": ["demo"], "token": ["a&b=c#d ?\u202eé"], "bin": ["1–9", "100–999"]}
    assert links.view_url("/neighbors/", {}) == "/neighbors"


def test_clickable_cells_put_one_marker_on_each_heatmap_cell():
    con = store.open_readonly(DEMO / store.DB_NAME)
    try:
        cells = read.novelty.novelty_summary(con.cursor(), 1024)
    finally:
        con.close()
    fig = links.clickable_cells(figures.novelty_heatmap(cells, "ppl_change", "t", "+.1%", "lower"), "click")
    heat, marks = fig.data
    assert heat.hoverinfo == "skip" and fig.layout.hoverdistance == -1
    assert len(marks.x) == len(heat.x) * len(heat.y)
    got = {(x, y): c for x, y, c in zip(marks.x, marks.y, marks.customdata, strict=True)}
    for _, r in cells.iterrows():  # each cell's marker carries that cell's value (the hover text)
        assert np.isclose(got[(r["L_t"], r["bin"])][0], r["ppl_change"], equal_nan=True)
    assert links.bin_target({"selection": {"points": [{"x": marks.x[0], "y": marks.y[0]}]}},
                            list(cells["bin"]), axis="y") == marks.y[0]


# --------------------------------------------------------------------------- the pages


def test_token_explorer_filtered_to_a_bin(demo_env):
    at = _open("tokens", bin="10–99")  # the form a bar links with: one label, that bin alone
    assert at.sidebar.select_slider[0].value == (1, 1)
    assert [s.value for s in at.subheader] == ["Evaluation targets in frequency bin 10–99"]
    shown = at.dataframe[0].value
    ref = _bin_types_reference(1)
    assert f"{len(ref):,} token type(s) are evaluation targets in bin 10–99" in at.caption[0].value
    top = ref.head(500)
    assert shown["token_id"].tolist() == top["token_id"].tolist()
    assert shown["n_eval"].tolist() == top["n_eval"].tolist()
    assert np.allclose(shown["mean_gain"], top["mean_gain"])
    assert not set(top["token_id"].head(50)) & set(_bin_types_reference(2)["token_id"])  # the check can tell bins apart
    path, query = _link(at)
    assert path == "/tokens" and query == {"run": ["demo"], "bin": ["10–99"]}


def test_token_search_within_a_bin_and_a_hostile_bin(demo_env):
    at = _open("tokens", token="the", bin=["10–99", "100–999"])
    types = _sql("SELECT token_id, freq_bin FROM token_types").set_index("token_id")["freq_bin"]
    options = at.selectbox(key="token_pick").options
    ids = [int(o.split(" · id ")[1].split(" ")[0]) for o in options]
    assert ids and all(types[i] in (1, 2) for i in ids)  # only types of bins 10–99 … 100–999
    assert 262 not in ids  # ' the' (bin 100,000–999,999) is the best match without the filter
    assert "restricted to frequency bin 10–99 … 100–999" in " ".join(c.value for c in at.caption)
    assert _link(at)[1] == {"run": ["demo"], "token": ["the"], "bin": ["10–99", "100–999"]}

    at = _open("tokens", bin="<b>x</b>")
    assert len(at.warning) == 1 and "is not one of" in at.warning[0].value and "<b>" in at.warning[0].value
    assert at.sidebar.select_slider[0].value == (-1, 5) and at.info  # no filter: the usual prompt


def test_a_staged_bin_link_opens_the_filtered_token_explorer(demo_env):
    """What a bar's on_select callback leaves (ui.widgets.stage_link) opens the Token explorer on that bin."""
    at = _open("bins")
    at.session_state["bin"] = (3, 3)
    at.session_state["_follow_link"] = (links.TOKENS_PAGE, {"bin": ["1,000–9,999", "1,000–9,999"]})
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.title[0].value == PAGE_TITLES["tokens"]
    assert at.subheader[0].value == "Evaluation targets in frequency bin 1,000–9,999"
    assert at.dataframe[0].value["token_id"].tolist() == _bin_types_reference(3)["token_id"].head(500).tolist()


def test_token_row_opens_the_inspector_at_its_position(demo_env):
    at = _open("tokens", token="262")
    occ = at.dataframe[-1].value
    ref = _sql("SELECT pos FROM eval_tokens WHERE token_id = 262 ORDER BY pos LIMIT 500")["pos"].tolist()
    assert occ["pos"].tolist() == ref
    pos = links.row_target({"selection": {"rows": [3]}}, occ["pos"].tolist())
    assert pos == ref[3]
    link = at.get("page_link")[-1].proto
    assert link.page == "neighbors" and parse_qs(link.query_string) == {"run": ["demo"], "pos": [str(ref[0])]}
    at = _open("neighbors", pos=str(pos))
    assert "id 262" in " ".join(c.value for c in at.caption)
    assert _link(at) == ("/neighbors", {"run": ["demo"], "pos": [str(pos)], "nbr": ["1"]})


def test_inspector_shows_a_neighbours_datastore_entry(demo_env):
    pos, rank, width = 5, 3, 128
    at = _open("neighbors", pos=str(pos), nbr=str(rank))
    entry = int(_sql("SELECT entry FROM neighbors WHERE pos = ? AND rank = ?", [pos, rank])["entry"].iloc[0])
    caption = next(c.value for c in at.caption if c.value.startswith("Datastore entry"))
    assert caption.startswith(f"Datastore entry {entry:,} (neighbour {rank})")
    stream = _sql("SELECT d.pos, v.token FROM datastore_tokens d LEFT JOIN vocab v USING (token_id) "
                  "WHERE d.pos BETWEEN ? AND ? ORDER BY d.pos", [entry - width + 1, entry])
    assert len(stream) == width
    block = next(m.value for m in at.markdown if f'title="neighbour {rank}"' in m.value and "overlap" in m.value
                 and html.escape(stream["token"].iloc[0]) in m.value)
    for tok in stream["token"].tail(8):  # its last tokens, each shown escaped
        assert html.escape(tok).replace("\n", "⏎") in block or tok.strip() == ""
    assert _link(at)[1]["nbr"] == [str(rank)]

    for value, note, shown in (("4.0", None, 4), ("99", "out of range", 1), ("2.5", "not a whole number", 1)):
        at = _open("neighbors", pos=str(pos), nbr=value)  # '4.0': how the float input writes its value
        assert [w.value for w in at.warning if note and note in w.value] == [w.value for w in at.warning]
        assert len(at.warning) == (1 if note else 0), value
        assert any(c.value.startswith("Datastore entry") and f"(neighbour {shown})" in c.value for c in at.caption)


def test_every_filter_is_in_the_url(demo_env):
    """The bins page's token and outcome filters, the explorer's sort and the novelty colour are URL-bound:
    a link restores them, a hostile value gets one warning line, and the copy link gives them back."""
    at = _open("bins", bins_tokens="31888,325", bins_outcome="harmed", bin=["10–99", "100–999"])
    assert at.sidebar.radio(key="bins_outcome").value == "harmed" and at.sidebar.text_input[0].value == "31888,325"
    ev = _sql("SELECT token_id, freq_bin, gain FROM eval_tokens")
    want = ev[ev["token_id"].isin([31888, 325]) & (ev["gain"] < 0) & ev["freq_bin"].between(1, 2)]
    assert len(want) > 0 and len(want) < len(ev[ev["token_id"].isin([31888, 325])])  # the outcome filter bites
    table = at.dataframe[0].value
    assert int(table["n_tokens"].sum()) == len(want)
    assert _link(at)[1] == {"run": ["demo"], "bin": ["10–99", "100–999"], "bins_tokens": ["31888,325"],
                            "bins_outcome": ["harmed"]}
    at = _open("bins", bins_outcome="<script>")
    assert len(at.warning) == 1 and "bins_outcome" in at.warning[0].value
    assert at.sidebar.radio(key="bins_outcome").value == "all"

    sort = "gain (worst first)"
    at = _open("tokens", token="262", token_sort=sort)
    occ = at.dataframe[-1].value
    ref = _sql("SELECT pos FROM eval_tokens WHERE token_id = 262 ORDER BY gain, pos LIMIT 500")["pos"].tolist()
    assert occ["pos"].tolist() == ref
    assert _link(at)[1]["token_sort"] == [sort]

    at = _open("novelty", novelty_metric="tokens")
    assert at.selectbox(key="novelty_metric").value == "tokens" and _link(at)[1]["novelty_metric"] == ["tokens"]
    at = _open("novelty", novelty_metric="nope")
    assert len(at.warning) == 1 and at.selectbox(key="novelty_metric").value.startswith("PPL change")
