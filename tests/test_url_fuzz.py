"""Fuzzing the dashboard's URL parameters (issue 18, items 5 and 7).

Property-based tests (hypothesis) over every parser of ui.params and the literal renderer
ui.render.md_code, then a table of hostile URLs run through AppTest on every page of the
shipped demo run: no exception, no error box, the page drawn, a one-line warning whenever the
URL's value was replaced, and no live link or HTML made from user text.
"""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path

import pytest
import streamlit as st
from conftest import PAGE_TITLES
from hypothesis import given, settings
from hypothesis import strategies as s
from streamlit.testing.v1 import AppTest

from ui.params import MAX_TEXT, parse_choice, parse_float, parse_int, parse_range, parse_text
from ui.render import md_code, visible

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
SHIPPED = REPO / "data" / "runs"
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)  # CommonMark code span (fences of equal length)
# Markdown / HTML that would become live if it escaped a code span (':' and '(' occur in the messages' own words).
LIVE = set("[]<>*_$`\\\n")

raw_values = s.lists(s.text(max_size=60), max_size=3)  # what st.query_params.get_all hands over
numberish = s.one_of(s.text(alphabet="0123456789+-.eE_ ²٣１nNaAiIfF", max_size=12), s.text(max_size=12))


def outside_code(markdown: str) -> str:
    """The markdown with its inline code spans removed: what Streamlit would render as markdown."""
    return CODE_SPAN.sub("", markdown)


def _one_line_and_inert(note: str | None) -> None:
    """A note is one line, and any user text in it sits inside a code span."""
    if note is not None:
        assert "\n" not in note and len(note) < 400
        assert not LIVE & set(outside_code(note)), note


# --------------------------------------------------------------------------- parsers (hypothesis)


@settings(max_examples=300, deadline=None)
@given(raw=s.one_of(raw_values, s.lists(numberish, min_size=1, max_size=1)), low=s.integers(-5, 5),
       span=s.integers(0, 10**6))
def test_parse_int(raw, low, span):
    high = low + span
    got = parse_int("k", raw, low, high, low)
    assert low <= got.value <= high
    _one_line_and_inert(got.note)
    if got.note is None and raw:  # accepted: exactly what int() reads, in range, ASCII digits only
        assert len(raw) == 1 and got.value == int(raw[0]) and raw[0].lstrip("+-").isascii()
    if len(raw) == 1 and raw[0].isascii() and re.fullmatch(r"[+-]?\d+", raw[0]) and low <= int(raw[0]) <= high:
        assert got.note is None  # and every valid value is accepted


@settings(max_examples=200, deadline=None)
@given(n=s.integers(-10**12, 10**12))
def test_parse_int_range(n):
    got = parse_int("pos", [str(n)], 0, 19_998, 0)
    assert (got.note is None) == (0 <= n <= 19_998) and got.value == (n if 0 <= n <= 19_998 else 0)


@settings(max_examples=300, deadline=None)
@given(raw=s.one_of(raw_values, s.lists(numberish, min_size=1, max_size=1)),
       x=s.floats(allow_nan=True, allow_infinity=True))
def test_parse_float(raw, x):
    for values in (raw, [repr(x)], [str(x)]):
        got = parse_float("lam", values, 0.0, 1.0, 0.25)
        assert math.isfinite(got.value) and 0.0 <= got.value <= 1.0
        _one_line_and_inert(got.note)
        if got.note is None and values:
            assert float(values[0]) == got.value
    assert (parse_float("lam", [repr(x)], 0.0, 1.0, 0.25).note is None) == (math.isfinite(x) and 0 <= x <= 1)


@settings(max_examples=300, deadline=None)
@given(raw=raw_values, choices=s.lists(s.text(alphabet="abcdefgh-", min_size=1, max_size=8), min_size=1,
                                       max_size=12, unique=True))
def test_parse_choice(raw, choices):
    got = parse_choice("run", raw, choices, choices[0])
    assert got.value in choices
    _one_line_and_inert(got.note)
    assert (got.note is None) == (raw == [] or (len(raw) == 1 and raw[0] in choices))
    if got.note is None and raw:
        assert got.value == raw[0]


@settings(max_examples=300, deadline=None)
@given(raw=s.one_of(raw_values, s.lists(s.text(min_size=150, max_size=400), min_size=1, max_size=1)))
def test_parse_text(raw):
    got = parse_text("token", raw)
    assert len(got.value) <= MAX_TEXT and not any(unicodedata.category(c) in ("Cc", "Cs") for c in got.value)
    _one_line_and_inert(got.note)
    clean = len(raw) == 1 and not any(unicodedata.category(c) in ("Cc", "Cs") for c in raw[0])
    if clean and len(raw[0]) <= MAX_TEXT:
        assert got == type(got)(raw[0])  # ordinary text passes untouched
    assert (got.note is None) == (not raw or (clean and len(raw[0]) <= MAX_TEXT))


LABELS = ["unseen", "1–9", "10–99", "100–999", "1,000–9,999"]


@settings(max_examples=300, deadline=None)
@given(raw=s.one_of(raw_values, s.lists(s.sampled_from(LABELS), max_size=3)))
def test_parse_range(raw):
    got = parse_range("bin", raw, LABELS)
    lo, hi = got.value
    assert 0 <= lo <= hi < len(LABELS)
    _one_line_and_inert(got.note)
    valid = 1 <= len(raw) <= 2 and all(r in LABELS for r in raw)
    assert (got.note is None) == (valid or not raw)
    if valid:
        assert {LABELS[lo], LABELS[hi]} == set(raw)


@settings(max_examples=500, deadline=None)
@given(text=s.text(max_size=80))
def test_md_code_is_one_literal_code_span(text):
    md = md_code(text)
    if not visible(text):
        assert md == "∅"
        return
    span = CODE_SPAN.fullmatch(md)
    assert span is not None and "\n" not in md, md
    content = span.group(2)
    if content.startswith(" ") and content.endswith(" ") and content.strip():
        content = content[1:-1]  # CommonMark strips one space each side
    assert content == visible(text)


# --------------------------------------------------------------------------- hostile URLs (AppTest)

TITLES = PAGE_TITLES
# Payload fragments that must never reach markdown outside a code span (a live link, HTML, emphasis).
PAYLOAD = ("evil.example", "<b>", "<script", "**bold**", ":red[", "$x^2$", "<img")
EVIL = ["[x](http://evil.example)", "<b>bold</b>", "<script>alert(1)</script>", "**bold**", ":red[alert]",
        "$x^2$", "![i](http://evil.example/i.png)", "http://evil.example", "<img src=x onerror=alert(1)>"]
BAD_INT = ["²", "٣", "１２", "3.5", "1e1", "-3", "99999999999", "9" * 40, "", " 5", "0x10", "nan", "inf", "1_0",
           "5\x00", "1" * 5000, "+-1"] + EVIL[:3]
BAD_FLOAT = ["nan", "NaN", "inf", "-inf", "1.5", "-0.1", "1e400", "0x1p-2", "1_0.0", "²", ".", "", "٠.٥", "0.5\n",
             "1" * 5000] + EVIL[:3]
BAD_CHOICE = ["", "zzz", "DEMO", "../demo", "demo\x00", "x" * 5000] + EVIL
TOKENS = EVIL + ["²", "99999999999999999999", "-1", "a\x00b", "x" * 5000, "\u202eevil.example", "line\nbreak",
                 "``` x", "\\", "%", "'; DROP TABLE token_types; --", "the"]


def _cases() -> list[tuple[str, dict, bool]]:
    """(page, query params, whether a value must be replaced with a warning): 150+ hostile URLs."""
    cases = []
    for v in BAD_INT:
        cases.append(("whatif", {"k": v}, True))
        cases.append(("neighbors", {"pos": v}, True))
    for v in BAD_FLOAT:
        cases.append(("whatif", {"tau": "1000" if v == "1.5" else v}, True))  # τ allows 0.1 … 100 here
        cases.append(("whatif", {"lam": v}, True))
    pages = list(TITLES)
    for i, v in enumerate(BAD_CHOICE):
        cases.append((pages[i % len(pages)], {"run": v}, True))
        cases.append(("bins", {"level": v}, True))
        cases.append(("compare", {"variant": v}, True))
    cases.append(("compare", {"variant_b": "[x](http://evil.example)"}, True))
    for v in TOKENS:  # any text is a valid query: replaced only when it holds control characters or is too long
        cases.append(("tokens", {"token": v}, any(unicodedata.category(c) == "Cc" for c in v) or len(v) > MAX_TEXT))
    cases += [("bins", {"bin": v}, True) for v in ("abc", "", "[x](http://evil.example)")]
    cases += [
        ("bins", {"bin": ["1–9", "zzz"]}, True),
        ("bins", {"bin": ["1–9", "10–99", "100–999"]}, True),
        ("bins", {"bin": ["100–999", "10–99"]}, False),  # reversed: ordered, not replaced
        ("whatif", {"k": ["3", "5"]}, True),
        ("neighbors", {"pos": ["1", "2"]}, True),
        ("tokens", {"token": ["the", "[x](http://evil.example)"]}, True),
        ("overview", {"run": ["demo", "demo-shakespeare"]}, True),
        ("whatif", {"k": "5", "tau": "2.5", "lam": "0.5"}, False),
        ("neighbors", {"pos": "19998"}, False),
        ("neighbors", {"pos": "19999"}, True),
        ("whatif", {"k": "1024"}, False),
        ("whatif", {"k": "1025"}, True),
    ]
    return cases


CASES = _cases()


def test_enough_hostile_urls():
    assert len(CASES) >= 150


@pytest.fixture(scope="module")
def shipped_app():
    """The app on the shipped runs (data/runs), with empty streamlit caches before and after."""
    if not (SHIPPED / "demo" / "metrics.duckdb").exists():
        pytest.skip("shipped runs not present")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNNLM_RUNS_DIR", str(SHIPPED))
        st.cache_data.clear()
        st.cache_resource.clear()
        yield
        st.cache_data.clear()
        st.cache_resource.clear()


def _markdown_texts(at: AppTest) -> list[str]:
    """Every string of the page that Streamlit renders as markdown."""
    kinds = (at.markdown, at.caption, at.info, at.warning, at.error, at.success, at.title, at.header, at.subheader)
    texts = [str(e.value) for kind in kinds for e in kind]
    texts += [str(link.proto.label) for link in at.get("page_link")]
    texts += [str(m.label) for m in at.metric]
    return texts


def _visit(page: str, params: dict) -> AppTest:
    """A fresh session opening /<page>?run=demo&<params> (one URL load; reruns it asks for included)."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page(f"pages/{page}.py")
    at.query_params["run"] = "demo"
    for key, value in params.items():
        at.query_params[key] = value
    return at.run()


def test_hostile_urls(shipped_app):
    problems = []
    for page, params, replaced in CASES:
        at = _visit(page, params)
        where = f"/{page}?{params!r}"[:160]
        if at.exception:
            problems.append((where, "exception", at.exception[0].message[:200]))
            continue
        if at.error:
            problems.append((where, "error box", at.error[0].value[:200]))
        if [t.value for t in at.title] != [TITLES[page]]:
            problems.append((where, "title", [t.value for t in at.title]))
        if not (at.dataframe or at.metric or at.get("page_link") or at.info):
            problems.append((where, "no main content", None))
        warnings = [w.value for w in at.warning if "URL parameter" in w.value or "using" in w.value]
        if replaced != bool(warnings):
            problems.append((where, "warning expected" if replaced else "unexpected warning", warnings))
        if any("\n" in w for w in warnings):
            problems.append((where, "warning over several lines", warnings))
        live = [t for t in _markdown_texts(at) if any(p in outside_code(t) for p in PAYLOAD)]
        if live:
            problems.append((where, "user text rendered as markdown", live[:2]))
    assert not problems, f"{len(problems)} of {len(CASES)} URLs: {problems[:10]}"
