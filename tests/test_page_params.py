"""Property-based tests over every page's parameters (issue 21, items 1, 4, 6).

Hypothesis drives each page of the dashboard through AppTest on the shipped runs (data/runs/demo and
demo-shakespeare), including values that select nothing: a token that is never an evaluation target,
the unseen bin with "helped only", a bin range none of the chosen tokens falls in, tokens of a single
document (bins without an interval), the first and last position, and huge or negative positions in
the URL. Every case asserts no exception, no error box and the page's title drawn (the hostile URLs
are tests/test_url_fuzz.py's; this file varies the pages' own parameters).

Cheap by construction: one AppTest session per page, kept across examples (each example sets every
widget of its page, then one `at.run()`); the query caches are process-wide, so only the drawing is
repeated. Fresh sessions are used only for URL values, which Streamlit reads when a session starts.
"""

from __future__ import annotations

import duckdb
import pytest
import streamlit as st
from conftest import PAGE_TITLES
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as s
from streamlit.testing.v1 import AppTest
from test_url_fuzz import APP, PAYLOAD, SHIPPED, _markdown_texts, outside_code

from knnlm_core import read, store

RUNS = ("demo", "demo-shakespeare")
CASES: dict[str, int] = {}  # page -> examples run (test_enough_cases adds them up)
PAGES_WITH_CASES = ("bins", "tokens", "neighbors", "novelty", "exact", "whatif", "mitigations", "compare", "overview")
MIN_CASES = 500
N = {"bins": 95, "tokens": 120, "neighbors": 110, "neighbors_url": 4, "novelty": 30, "exact": 40, "whatif": 130,
     "mitigations": 4, "compare": 12}  # generated examples per test (small spaces end earlier: CASES counts runs)
# Deterministic, no example database, no shrinking (a failing case is reported as drawn: shrinking would rerun
# pages for minutes); fixtures are module-scoped sessions on purpose.
FAST = settings(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


def cases(n: int) -> settings:
    """FAST with n generated examples."""
    return settings(FAST, max_examples=n)


# Token-box texts that select nothing, one type, several, or text no type matches ('film' is a type of
# the datastore: never a target of the out-of-domain run; 26240 `'film'` never a target of either).
TEXTS = ["film", "the", " the", "The", "THE", "26240", "262", "-1", "99999999", "9" * 12, "film, the", ",", " , ",
         "Boulter", "%", "'", "zzzz-no-such", "[x](http://evil.example)", "<b>b</b>", "²", "the,the,the", "0"]


@pytest.fixture(scope="module")
def pools() -> dict[str, dict]:
    """Per shipped run, values read from its database: bins, positions, and token ids that are never an
    evaluation target, that occur in one document only (no interval), rare and frequent ones."""
    if not (SHIPPED / "demo" / store.DB_NAME).exists():
        pytest.skip("shipped runs not present")
    out = {}
    for run in RUNS:
        con = duckdb.connect(str(SHIPPED / run / store.DB_NAME), read_only=True)
        try:
            one = """SELECT token_id FROM eval_tokens GROUP BY token_id HAVING count(DISTINCT doc_id) = 1
                     ORDER BY count(*) DESC, token_id LIMIT 40"""  # the first: the most occurrences
            out[run] = {
                "bins": [r[0] for r in con.execute("SELECT DISTINCT freq_bin FROM eval_tokens ORDER BY 1").fetchall()],
                "n_eval": con.execute("SELECT n_eval FROM run").fetchone()[0],
                "never": [r[0] for r in con.execute(
                    "SELECT token_id FROM token_types WHERE eval_count = 0 ORDER BY freq DESC LIMIT 40").fetchall()],
                "one_doc": [r[0] for r in con.execute(one).fetchall()],
                "targets": [r[0] for r in con.execute(
                    "SELECT token_id FROM token_types WHERE eval_count > 0 ORDER BY token_id LIMIT 400").fetchall()],
                "words": [r[0] for r in con.execute(
                    "SELECT DISTINCT word FROM eval_words ORDER BY word LIMIT 200").fetchall()],
            }
        finally:
            con.close()
    return out


@pytest.fixture(scope="module")
def sessions(pools):
    """One AppTest per page on the shipped runs, created on first use, with empty caches before and after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNNLM_RUNS_DIR", str(SHIPPED))
        st.cache_data.clear()
        st.cache_resource.clear()
        made: dict[str, AppTest] = {}

        def get(page: str) -> AppTest:
            if page not in made:
                made[page] = fresh(page, {})
            return made[page]

        yield get
        st.cache_data.clear()
        st.cache_resource.clear()


def fresh(page: str, params: dict) -> AppTest:
    """A new session opening /<page>?run=demo&<params>."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page(f"pages/{page}.py")
    at.query_params["run"] = "demo"
    for key, value in params.items():
        at.query_params[key] = value
    return at.run()


def check(at: AppTest, page: str, case: object, text: str = "") -> None:
    """No exception, no error box, the page's title, and no fragment of the user's `text` that would be live
    markdown or HTML (tests/test_url_fuzz.py's PAYLOAD) outside a code span."""
    CASES[page] = CASES.get(page, 0) + 1
    where = f"{page} {case!r}"[:300]
    assert not at.exception, (where, at.exception[0].message[:500])
    assert not at.error, (where, at.error[0].value[:300])
    assert [t.value for t in at.title] == [PAGE_TITLES[page]], (where, [t.value for t in at.title])
    payload = [p for p in PAYLOAD if p in text]
    live = [t for t in _markdown_texts(at) if any(p in outside_code(t) for p in payload)] if payload else []
    assert not live, (where, live[:2])


def pick_run(at: AppTest, run: str) -> None:
    """Select `run` in the sidebar when it is not the current one (the session keeps every other widget)."""
    box = at.selectbox(key="run")
    if box.value != run:
        box.set_value(run)


def widget(at: AppTest, kind: str, key: str):
    """The page's widget of `kind` with `key`, or None when the last run did not draw it (the page stopped)."""
    found = [w for w in at.get(kind) if getattr(w, "key", None) == key]
    return found[0] if found else None


# --------------------------------------------------------------------------- Frequency bins


@cases(N["bins"])
@given(data=s.data())
def test_bins_page_params(sessions, pools, data):
    at = sessions("bins")
    run = data.draw(s.sampled_from(RUNS), "run")
    pool = pools[run]
    bins = pool["bins"]
    level = data.draw(s.sampled_from(["token", "token", "token", "word"]), "level")
    lo, hi = sorted(data.draw(s.lists(s.sampled_from(bins), min_size=2, max_size=2), "bins"))
    ids = s.sampled_from(pool["never"] + pool["one_doc"] + pool["targets"][:40]).map(str)
    text = data.draw(s.one_of(s.just(""), s.sampled_from(TEXTS), ids, s.lists(ids, min_size=1, max_size=3).map(",".join),
                              s.text(max_size=8)), "text")
    outcome = data.draw(s.sampled_from(read.run.OUTCOMES), "outcome")
    pick_run(at, run)
    if level == "token" and widget(at, "text_input", "bins_tokens") is None:  # the last case was word level
        widget(at, "button_group", "level").set_value("token")
        at.run()
    widget(at, "button_group", "level").set_value(level)
    if level == "token":
        at.select_slider(key="bin").set_value((lo, hi))
        at.text_input(key="bins_tokens").set_value(text)
        at.radio(key="bins_outcome").set_value(outcome)
    at.run()
    check(at, "bins", (run, level, lo, hi, text, outcome), text)


def test_bins_empty_selections(sessions, pools):
    """The issue's two crash paths on the page: a token never evaluated, and the unseen bin with 'helped only'."""
    at = sessions("bins")
    for run, text, lo, hi, outcome in [("demo", "26240", -1, 5, "all"), ("demo-shakespeare", "film", -1, 5, "all"),
                                       ("demo", "", -1, -1, "helped"), ("demo-shakespeare", "", -1, -1, "helped")]:
        pick_run(at, run)
        widget(at, "button_group", "level").set_value("token")
        at.run()
        at.select_slider(key="bin").set_value((lo, hi))
        at.text_input(key="bins_tokens").set_value(text)
        at.radio(key="bins_outcome").set_value(outcome).run()
        check(at, "bins", (run, text, lo, hi, outcome))
        assert "No evaluation token matches these filters" in " ".join(i.value for i in at.info), (run, text, outcome)
        assert not at.dataframe


def test_bins_single_document_tokens(sessions, pools):
    """Tokens of one document: every bin is drawn without an interval, and the table says so."""
    at = sessions("bins")
    pick_run(at, "demo")
    widget(at, "button_group", "level").set_value("token")
    at.run()
    at.select_slider(key="bin").set_value((-1, 5))
    at.text_input(key="bins_tokens").set_value(str(pools["demo"]["one_doc"][0]))  # ' Du': 75 tokens, one document
    at.radio(key="bins_outcome").set_value("all").run()
    check(at, "bins", "one document")
    table = at.dataframe[0].value
    assert len(table) and (table["n_docs"] == 1).all() and table["ppl_change_ci_lo"].isna().all()
    assert (table["ci_note"] == "no interval: < 5 documents").all() and (table["knnlm_vs_lm"] == "no interval").all()


# --------------------------------------------------------------------------- Token explorer


@cases(N["tokens"])
@given(data=s.data())
def test_tokens_page_params(sessions, pools, data):
    at = sessions("tokens")
    run = data.draw(s.sampled_from(RUNS), "run")
    pool = pools[run]
    ids = s.sampled_from(pool["never"] + pool["one_doc"] + pool["targets"]).map(str)
    text = data.draw(s.one_of(s.sampled_from(TEXTS), ids, s.sampled_from(pool["words"]), s.text(max_size=10),
                              s.integers(-10**12, 10**12).map(str)), "token")
    sort = data.draw(s.sampled_from(list(read.tokens.OCCURRENCE_SORTS)), "sort")
    nth = data.draw(s.integers(0, 60), "pick")
    pick_run(at, run)
    at.text_input(key="token").set_value(text)
    if widget(at, "selectbox", "token_sort"):
        at.selectbox(key="token_sort").set_value(sort)
    at.run()
    box = widget(at, "selectbox", "token_pick")
    if box is not None and nth:  # another of the matching types
        box.set_value(nth % len(box.options)).run()
    check(at, "tokens", (run, text, sort, nth), text)


# --------------------------------------------------------------------------- Neighbour inspector


@cases(N["neighbors"])
@given(data=s.data())
def test_neighbors_page_params(sessions, pools, data):
    at = sessions("neighbors")
    run = data.draw(s.sampled_from(RUNS), "run")
    last = pools[run]["n_eval"] - 1
    pos = data.draw(s.one_of(s.integers(0, last), s.sampled_from([0, 1, 62, 63, 64, last - 1, last])), "pos")
    pick_run(at, run)
    at.number_input(key="pos").set_value(float(pos)).run()
    check(at, "neighbors", (run, pos))
    assert at.number_input(key="pos").value == pos


@cases(N["neighbors_url"])
@given(pos=s.one_of(s.integers(max_value=-1), s.integers(min_value=19_999), s.integers(0, 19_998)))
def test_neighbors_url_positions(sessions, pos):
    """Huge and negative ?pos= in a new session: replaced by the informative default with a warning."""
    at = fresh("neighbors", {"pos": str(pos)})
    check(at, "neighbors", pos)
    if not 0 <= pos <= 19_998:
        assert any("out of range" in w.value for w in at.warning)


def test_neighbors_default_position(sessions):
    """Without ?pos= the inspector opens on read.inspector.default_position, recomputed here with pandas, and says so."""
    sessions("neighbors")  # the app on the shipped runs
    at = fresh("neighbors", {})
    con = duckdb.connect(str(SHIPPED / "demo" / store.DB_NAME), read_only=True)
    try:
        ev = con.execute("SELECT pos, freq, gain FROM eval_tokens").df()
    finally:
        con.close()
    full = ev[ev["pos"] >= 63].assign(rare=lambda d: d["freq"].between(1, 999), mag=lambda d: d["gain"].abs())
    want = int(full.sort_values(["rare", "mag", "pos"], ascending=[False, False, True])["pos"].iloc[0])
    assert at.number_input(key="pos").value == want != 0
    assert any(f"Opened on position {want}" in c.value for c in at.caption)
    check(at, "neighbors", "default")


# --------------------------------------------------------------------------- the other pages


@cases(N["novelty"])
@given(data=s.data())
def test_novelty_page_params(sessions, data):
    at = sessions("novelty")
    run = data.draw(s.sampled_from(RUNS), "run")
    box = at.selectbox(key="novelty_metric")  # a metric of the current run, kept when the run changes
    box.set_value(data.draw(s.sampled_from(box.options), "metric"))
    pick_run(at, run)
    at.run()
    check(at, "novelty", run)


@cases(N["exact"])
@given(data=s.data())
def test_exact_page_params(sessions, pools, data):
    at = sessions("exact")
    run = data.draw(s.sampled_from(RUNS), "run")
    box = widget(at, "selectbox", "exact_bin")
    choice = data.draw(s.sampled_from(["all", *pools[run]["bins"]]), "bin")
    if box is not None:
        box.set_value(choice)
    pick_run(at, run)
    at.run()
    check(at, "exact", (run, choice))


@cases(N["whatif"])
@given(data=s.data())
def test_whatif_page_params(sessions, data):
    at = sessions("whatif")
    run = data.draw(s.sampled_from(RUNS), "run")
    k = at.slider(key="k")
    values = {"k": data.draw(s.integers(int(k.min), int(k.max)), "k"),
              "tau": round(data.draw(s.integers(1, 1000), "tau") / 10, 1),
              "lam": data.draw(s.integers(0, 100), "lam") / 100}
    for key, value in values.items():
        slider = at.slider(key=key)
        if not slider.disabled:
            slider.set_value(min(max(value, slider.min), slider.max))
    at.toggle(key="whatif_idf").set_value(data.draw(s.booleans(), "idf"))
    source = widget(at, "radio", "whatif_source")
    if source is not None and not source.disabled:
        source.set_value(data.draw(s.sampled_from(source.options), "source"))
    pick_run(at, run)
    at.run()
    check(at, "whatif", (run, values))


@cases(N["mitigations"])
@given(run=s.sampled_from(RUNS))
def test_mitigations_and_overview(sessions, run):
    for page in ("mitigations", "overview"):
        at = sessions(page)
        pick_run(at, run)
        at.run()
        check(at, page, run)


@cases(N["compare"])
@given(data=s.data())
def test_compare_page_params(sessions, data):
    at = sessions("compare")
    run = data.draw(s.sampled_from(RUNS), "run")
    for key in ("variant", "variant_b"):
        box = widget(at, "selectbox", key)
        if box is not None:
            box.set_value(data.draw(s.sampled_from(box.options), key))
    pick_run(at, run)
    at.run()
    check(at, "compare", run)


def test_enough_cases():
    """The suite above ran at least MIN_CASES generated cases (skipped when run in part, e.g. with -k)."""
    if set(CASES) != set(PAGES_WITH_CASES):
        pytest.skip(f"only part of the suite ran: {sorted(CASES)}")
    assert sum(CASES.values()) >= MIN_CASES, CASES
    print(f"page-parameter cases: {sum(CASES.values())} {CASES}")  # shown with -rP
