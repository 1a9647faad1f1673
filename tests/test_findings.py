"""Every findings row's verdict follows its stated rule (knnlm_core.read.findings; issue 21 item 4) on both shipped runs.

Each row's statistic is recomputed here from the run's DuckDB tables with plain numpy / pandas / scipy (an
independent bootstrap loop over documents, seeded as SPEC §11 says: numpy.random.default_rng(0), 1,000
resamples of n_docs documents, 2.5 / 97.5 percentiles), the row's rule is applied to it, and the mark
is compared with the one the Overview shows. Also: the Overview shows every findings row (no height cut)
and the rule beside each claim. The helpers here are the reference recomputations test_app_compare uses.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import app_on
from scipy import stats
from streamlit.testing.v1 import AppTest

from knnlm_core import bootstrap, store
from knnlm_core import read as read_side

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "data" / "runs"
SHIPPED = ("demo", "demo-shakespeare")
N_BOOT, SEED, LEVEL = 1000, 0, 95.0  # SPEC §11 (B >= 1,000, seeded, 95% percentile intervals)
MIN_TOKENS, MIN_DOCS = 30, 5  # fewer tokens or documents: no interval (SPEC §11)
ALPHA = 0.05

needs_runs = pytest.mark.skipif(not all((RUNS / r / store.DB_NAME).is_file() for r in SHIPPED),
                                reason="shipped runs not present")


# --------------------------------------------------------------------------- reference recomputations


def read(run: str, sql: str) -> pd.DataFrame:
    """A query over a shipped run's database, read-only, as pandas."""
    con = duckdb.connect(str(RUNS / run / store.DB_NAME), read_only=True)
    try:
        return con.execute(sql).df()
    finally:
        con.close()


def per_doc(doc: np.ndarray, group: np.ndarray, values: dict[str, np.ndarray], n_docs: int,
            groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(groups (G,), token counts (D, G), {name: per-document sums (D, G)}) with pandas pivot tables."""
    df = pd.DataFrame({"doc": doc, "g": group, "n": 1.0, **{k: np.asarray(v, np.float64) for k, v in values.items()}})
    groups = np.sort(df["g"].unique()) if groups is None else groups
    out = {}
    for col in ["n", *values]:
        table = df.pivot_table(index="doc", columns="g", values=col, aggfunc="sum", fill_value=0.0)
        out[col] = table.reindex(index=range(n_docs), columns=groups, fill_value=0.0).to_numpy(np.float64)
    return groups, out.pop("n"), out


def boot(n_docs: int, n: np.ndarray, sums: dict[str, np.ndarray], stat, seed: int = SEED):
    """(point, lo, hi) per group of stat(n, sums) (each (G,)), lo / hi from a plain loop over the resamples;
    NaN bounds where a group has < MIN_TOKENS tokens or tokens in < MIN_DOCS documents."""
    draws = np.random.default_rng(seed).integers(0, n_docs, size=(N_BOOT, n_docs))
    with np.errstate(divide="ignore", invalid="ignore"):
        point = stat(n.sum(axis=0), {k: v.sum(axis=0) for k, v in sums.items()})
        samples = np.array([stat(n[d].sum(axis=0), {k: v[d].sum(axis=0) for k, v in sums.items()}) for d in draws])
    lo, hi = np.nanpercentile(samples, [(100 - LEVEL) / 2, 100 - (100 - LEVEL) / 2], axis=0)
    small = (n.sum(axis=0) < MIN_TOKENS) | ((n > 0).sum(axis=0) < MIN_DOCS)
    return point, np.where(small, np.nan, lo), np.where(small, np.nan, hi), samples


def ppl_change(a: str, b: str):
    """stat: relative PPL change of NLL sums a vs b (exp of the mean difference − 1)."""
    return lambda n, s: np.expm1((s[a] - s[b]) / n)


def mean_of(a: str, b: str | None = None):
    """stat: mean of a (minus mean of b)."""
    return lambda n, s: (s[a] - (s[b] if b else 0.0)) / n


def sign(lo: float, hi: float) -> int | None:
    """+1 / −1 when [lo, hi] lies above / below 0, 0 when it includes 0, None without an interval."""
    if np.isnan(lo) or np.isnan(hi):
        return None
    return 1 if lo > 0 else -1 if hi < 0 else 0


def mark(signs: list[int | None], want: list[int]) -> str:
    """The rule shared by the per-bin rows: ✗ when any sign is the opposite of the wanted one, ✓ when all are
    the wanted one, ≈ when the rest include 0, – when a bin has no interval."""
    if any(s == -w for s, w in zip(signs, want, strict=True)):
        return "✗"
    if all(s == w for s, w in zip(signs, want, strict=True)):
        return "✓"
    return "≈" if all(s is not None for s in signs) else "–"


def corr_mark(x: np.ndarray, y: np.ndarray) -> tuple[str, float]:
    """(mark by the correlation rule: ✓ r < 0 with p < ALPHA, ✗ r > 0 with p < ALPHA, ≈ otherwise; scipy's r)."""
    r, p = stats.pearsonr(x, y)
    return ("≈" if p >= ALPHA else "✓" if r < 0 else "✗"), float(r)


def load(run: str) -> dict:
    """The per-position and per-type tables of a shipped run, and its run row."""
    ev = read(run, "SELECT * EXCLUDE (token) FROM eval_tokens ORDER BY pos")
    types = read(run, "SELECT token_id, freq, freq_bin, contamination, pq_error_mean FROM token_types")
    return {"ev": ev, "types": types, "run": read(run, "SELECT * FROM run").iloc[0].to_dict()}


def expected_marks(t: dict) -> tuple[list[str], dict]:
    """The 12 marks each row's rule gives on the recomputed statistics (Overview order), and the correlations."""
    ev, types, run = t["ev"], t["types"], t["run"]
    docs, nd = ev["doc_id"].to_numpy(), int(run["n_docs"])
    fb = ev["freq_bin"].to_numpy()
    groups, n, s = per_doc(docs, fb, {"knn": ev["nll_knnlm"], "lm": ev["nll_lm"], "pknn": ev["p_knn"],
                                      "plm": ev["p_lm"], "hit_16": ev["hit_16"], "hit_1024": ev["hit_1024"]}, nd)
    _, lo, hi, _ = boot(nd, n, s, ppl_change("knn", "lm"))
    g = {b: i for i, b in enumerate(groups)}
    seen = [b for b in groups if b >= 0]
    marks = [mark([sign(lo[g[seen[0]]], hi[g[seen[0]]]), sign(lo[g[seen[-1]]], hi[g[seen[-1]]])], [1, -1])]
    _, lo, hi, _ = boot(nd, n, s, mean_of("pknn", "plm"))
    rare = [b for b in seen if b <= 2]
    marks.append(mark([sign(lo[g[b]], hi[g[b]]) for b in rare], [-1] * len(rare)))
    for k, top in ((1024, 0), (16, 3)):  # the value decides where a bin has no interval
        val, lo, hi, _ = boot(nd, n, s, mean_of(f"hit_{k}"))
        bins = [g[b] for b in seen if b <= top]
        lo, hi = np.where(np.isnan(lo), val, lo), np.where(np.isnan(hi), val, hi)
        signs = [-1 if hi[i] < 0.5 else 1 if lo[i] >= 0.5 else 0 for i in bins]
        marks.append(mark(signs, [-1] * len(signs)))
    rare_types = types[(types["freq"] >= 1) & (types["freq_bin"] == 0)]
    marks.append("✓" if rare_types["contamination"].mean() > 0.5 else "✗")
    ty = types[(types["freq"] >= 1) & types["pq_error_mean"].notna()]
    m_freq, r_freq = corr_mark(np.log10(ty["freq"]), ty["pq_error_mean"])
    joined = ev.merge(types[["token_id", "pq_error_mean"]], on="token_id").dropna(subset=["pq_error_mean"])
    m_gain, r_gain = corr_mark(joined["pq_error_mean"], joined["gain"])
    ctx = ev[(ev["freq"] >= 1) & (ev["context_freq"] >= 1)]
    m_ctx, r_ctx = corr_mark(np.log10(ctx["context_freq"]), np.log10(ctx["freq"]))
    marks += [m_freq, m_gain, m_ctx, *exact_marks(ev, nd, float(run["lambda"])), *novelty_marks(ev, nd)]
    return marks, {"freq_pq": r_freq, "gain": r_gain, "ctx": r_ctx}


def exact_marks(ev: pd.DataFrame, nd: int, lam: float) -> list[str]:
    """The two SPEC §8 rows: over the rare bins kNN-LM (IVFPQ) harms significantly, the exact-vs-IVFPQ change
    lies below 0 (✓) / the exact kNN-LM vs LM change lies above 0 (✓); – without exact search or harmed bin."""
    ex = ev[ev["p_knn_exact"].notna() & ev["freq_bin"].between(0, 2)]
    if ex.empty:
        return ["–", "–"]
    nll = {c: -np.log(lam * ex[f"p_knn_{c}"] + (1 - lam) * ex["p_lm"]) for c in ("ivf_pq", "exact")}
    _, n, s = per_doc(ex["doc_id"].to_numpy(), ex["freq_bin"].to_numpy(), {**nll, "lm": ex["nll_lm"]}, nd)
    _, lo, hi, _ = boot(nd, n, s, ppl_change("ivf_pq", "lm"))
    harmed = [i for i in range(len(lo)) if sign(lo[i], hi[i]) == 1]
    if not harmed:
        return ["–", "–"]
    out = []
    for stat, want in ((ppl_change("exact", "ivf_pq"), -1), (ppl_change("exact", "lm"), 1)):
        _, lo, hi, _ = boot(nd, n, s, stat)
        out.append(mark([sign(lo[i], hi[i]) for i in harmed], [want] * len(harmed)))
    return out


def novelty_marks(ev: pd.DataFrame, nd: int) -> list[str]:
    """The two SPEC §12 rows: the share of the total NLL gain at L_t >= 4 (✓ above 50%, ✗ below, ≈ across,
    – without a net gain or an interval) and kNN-LM's PPL change on rare targets after L_t <= 1 (✓ above 0)."""
    found = (ev["ctx_match_len"] >= 4).to_numpy().astype(int)
    gain = -(ev["nll_knnlm"] - ev["nll_lm"]).to_numpy()
    _, n, s = per_doc(ev["doc_id"].to_numpy(), found, {"gain": gain}, nd, groups=np.array([0, 1]))
    if n[:, 1].sum() == 0 or n[:, 0].sum() == 0 or gain.sum() <= 0:
        share = "–"
    else:
        _, _, _, samples = boot(nd, n, s, lambda n_, s_: s_["gain"] / s_["gain"].sum())
        totals = np.array([s["gain"][d].sum() for d in np.random.default_rng(SEED).integers(0, nd, (N_BOOT, nd))])
        small = n[:, 1].sum() < MIN_TOKENS or (n[:, 1] > 0).sum() < MIN_DOCS or (totals <= 0).any()
        lo, hi = np.nanpercentile(samples[:, 1], [2.5, 97.5])
        share = "–" if small else "✓" if lo > 0.5 else "✗" if hi < 0.5 else "≈"
    novel = ev[ev["freq_bin"].between(0, 2) & (ev["ctx_match_len"] <= 1)]
    if novel.empty:
        return [share, "–"]
    _, n, s = per_doc(novel["doc_id"].to_numpy(), np.zeros(len(novel), int),
                      {"knn": novel["nll_knnlm"], "lm": novel["nll_lm"]}, nd)
    _, lo, hi, _ = boot(nd, n, s, ppl_change("knn", "lm"))
    return [share, {1: "✓", -1: "✗", 0: "≈", None: "–"}[sign(lo[0], hi[0])]]


def shown_findings(run: str) -> pd.DataFrame:
    """The findings table exactly as the Overview builds it (read.findings over the run's read queries)."""
    con = store.open_readonly(RUNS / run / store.DB_NAME)
    try:
        cur = con.cursor()
        info = read_side.run.run_info(cur)
        k = info["k"]
        exact = read_side.exact.exact_bin_summary(cur, k, float(info["lambda"])) if read_side.exact.has_exact(cur) else None
        checks = read_side.findings.evaluate(read_side.bins.bin_summary(cur, k), k, read_side.bins.corr_pq_error_gain(cur),
                                   read_side.bins.corr_context_freq(cur), read_side.bins.corr_freq_pq_error(cur), exact,
                                   read_side.novelty.novelty_findings(cur))
        return read_side.findings.to_frame(checks)
    finally:
        con.close()


def check_marks(table: pd.DataFrame, want: list[str]) -> None:
    """Each row's shown verdict is the one its rule gives on the recomputed statistic."""
    got = list(table["verdict"])
    bad = [f"{c}: shown {g}, rule gives {w}" for c, g, w in zip(table["claim"], got, want, strict=True) if g != w]
    assert not bad, bad


# --------------------------------------------------------------------------- tests


def test_reference_constants_are_the_spec_ones():
    assert (bootstrap.N_BOOT, bootstrap.SEED, bootstrap.MIN_TOKENS, bootstrap.MIN_DOCS) == (N_BOOT, SEED, MIN_TOKENS,
                                                                                           MIN_DOCS)
    assert read_side.findings.ALPHA == ALPHA


@needs_runs
@pytest.mark.parametrize("run", SHIPPED)
def test_every_findings_row_follows_its_rule_on_the_shipped_runs(run):
    t = load(run)
    want, r = expected_marks(t)
    table = shown_findings(run)
    assert len(table) == 12 and table["rule"].str.len().gt(20).all()  # every row states its rule
    check_marks(table, want)
    numbers = dict(zip(range(len(table)), table["this run"]))
    for row, key in ((5, "freq_pq"), (6, "gain"), (7, "ctx")):  # the r shown is scipy's
        assert f"r = {r[key]:.3f}" in numbers[row], (numbers[row], r[key])
    if run == "demo-shakespeare":  # the row: r = −0.010, p = 0.23 is not a significant correlation
        assert "r = -0.010" in numbers[7] and "p = 0.23" in numbers[7] and want[7] == "≈"
        wrong = table.copy()
        wrong.loc[7, "verdict"] = "✓"  # what the Overview showed before: the check catches it
        with pytest.raises(AssertionError, match="shown ✓, rule gives ≈"):
            check_marks(wrong, want)


@needs_runs
def test_marks_follow_edited_data():
    """On an edited copy of the context-frequency columns the reference and the row agree on the new mark: with
    context_freq set to the target's freq (r = +1 over the same rows) both give ✗, where the shipped data gives ≈."""
    ev = read("demo-shakespeare", "SELECT freq, context_freq FROM eval_tokens WHERE freq >= 1 AND context_freq >= 1")
    assert corr_mark(np.log10(ev["context_freq"]), np.log10(ev["freq"]))[0] == "≈"
    edited = ev.assign(context_freq=ev["freq"] * (1 + np.arange(len(ev)) % 3))  # ranks follow freq: r ≈ +1
    x, y = np.log10(edited["context_freq"]), np.log10(edited["freq"])
    assert corr_mark(x, y)[0] == "✗"
    assert read_side.findings.to_frame([read_side.findings.context_freq_corr(read_side.bins.pearson_of(x, y))])["verdict"].iloc[0] == "✗"


def test_correlation_rule_on_hand_cases():
    """CORR_RULE: the sign counts only with p < 0.05; the range note is a caveat on a row that holds."""
    cases = {(-0.010, 0.23): "≈", (-0.035, 1.5e-6): "✓", (0.151, 1e-100): "✗", (0.02, 0.4): "≈", (-0.3, 0.001): "✓"}
    for (r, p), want in cases.items():
        for fn in (read_side.findings.pq_error_rarer, read_side.findings.pq_error_gain, read_side.findings.context_freq_corr):
            f = fn({"r": r, "n": 1000, "p": p})
            assert read_side.findings.to_frame([f])["verdict"].iloc[0] == want, (fn.__name__, r, p)
            assert f.rule == read_side.findings.CORR_RULE
    assert "outside its range" in read_side.findings.context_freq_corr({"r": -0.3, "n": 1000, "p": 0.001}).note
    assert "No significant correlation" in read_side.findings.context_freq_corr({"r": -0.010, "n": 13280, "p": 0.23}).note


@needs_runs
def test_overview_shows_every_findings_row(monkeypatch):
    """The findings table is drawn whole (height "content", not a ten-row window) with the rule column. AppTest
    keeps no element height, so the height is read off the st.dataframe call."""
    import streamlit as st

    heights = []
    draw = st.dataframe

    def recording(data=None, *args, **kwargs):
        if isinstance(data, pd.DataFrame) and "claim" in data:
            heights.append(kwargs.get("height", "auto"))
        return draw(data, *args, **kwargs)

    monkeypatch.setattr(st, "dataframe", recording)
    env = app_on(RUNS, monkeypatch)
    next(env)
    try:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
        at.query_params["run"] = "demo-shakespeare"
        at.run()
        assert not at.exception and not at.error
        frame = next(d.value for d in at.dataframe if "claim" in d.value.columns)
        assert len(frame) == 12 and list(frame.columns[:3]) == ["verdict", "claim", "rule"]
        assert heights == ["content"]  # the whole table, no scrolling window of ten rows
        assert frame["verdict"].iloc[7] == "≈"
    finally:
        next(env, None)
