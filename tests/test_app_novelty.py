"""AppTest of the context-novelty view, the inspector's overlap highlight, the SPEC §12 findings rows and
the ∞-gram baseline on Mitigations / Compare (issue 17), on the session's real tiny runs. Every number
checked is recomputed here from eval_tokens / neighbors / datastore_tokens with numpy."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import PAGE_TITLES, app_on
from test_app_pages import _texts, open_page

from knnlm_core import infgram, store
from ui.render import MATCH_TITLE, OVERLAP_TITLE


def _read(run_dir: Path, sql: str, params: list | None = None) -> pd.DataFrame:
    con = store.open_readonly(run_dir / store.DB_NAME)
    try:
        return con.execute(sql, params or []).df()
    finally:
        con.close()


def _eval(run_dir: Path) -> pd.DataFrame:
    ev = _read(run_dir, "SELECT * FROM eval_tokens ORDER BY pos")
    return ev.assign(ctx_bin=infgram.ctx_len_bin(ev["ctx_match_len"].to_numpy()))


def _cell_reference(g: pd.DataFrame, total_gain: float) -> dict:
    """The figures of one cell straight from its eval_tokens rows."""
    copy = g["copy_share"].dropna()
    return {"n_tokens": len(g), "ppl_lm": np.exp(g["nll_lm"].mean()), "ppl_knnlm": np.exp(g["nll_knnlm"].mean()),
            "ppl_change": np.exp(g["nll_knnlm"].mean() - g["nll_lm"].mean()) - 1,
            "share_harmed": (g["nll_knnlm"] > g["nll_lm"]).mean(), "hit_16": g["hit_16"].astype(float).mean(),
            "mean_gain": g["gain"].mean(), "n_copy_share": len(copy),
            "mean_copy_share": copy.mean() if len(copy) else np.nan,
            "share_of_gain": g["gain"].sum() / total_gain if total_gain > 0 else np.nan}


def _assert_rows(shown: pd.DataFrame, groups, total_gain: float, label) -> None:
    shown = shown.set_index(label)
    n = 0
    for key, g in groups:
        row, want = shown.loc[key], _cell_reference(g, total_gain)
        for col, value in want.items():
            if np.isnan(value):
                assert pd.isna(row[col]), (key, col)
            else:
                assert row[col] == pytest.approx(value, rel=1e-9), (key, col)
        n += 1
    assert len(shown) == n


def test_novelty_view_equals_eval_tokens(runs_env):
    at = open_page("novelty")
    assert at.title[0].value == PAGE_TITLES["novelty"] and not at.error
    ev = _eval(runs_env / "tiny")
    total = float(ev["gain"].sum())
    cells, by_ctx = at.dataframe[0].value, at.dataframe[1].value
    _assert_rows(cells, ev.groupby(["freq_bin", "ctx_bin"]), total, ["freq_bin", "ctx_bin"])
    _assert_rows(by_ctx, ev.groupby("ctx_bin"), total, "ctx_bin")
    assert list(by_ctx["L_t"]) == [infgram.CTX_BIN_LABELS[b] for b in sorted(ev["ctx_bin"].unique())]
    # SPEC §11: each figure has interval columns and n_docs (the tiny run is one document: none has an interval)
    assert {"ppl_change_ci_lo", "share_harmed_ci_hi", "hit_16_ci_lo", "mean_copy_share_ci_lo", "share_of_gain_ci_hi",
            "n_docs", "knnlm_vs_lm"} <= set(cells.columns)
    assert (cells["n_docs"] == 1).all() and (cells["knnlm_vs_lm"] == "no interval").all()
    assert "kNN-LM changes perplexity by" in _texts(at)
    assert "ppl_infgram" not in cells  # no validation corpus: no ∞-gram variant, and the page says so
    assert "no ∞-gram baseline" in _texts(at)
    # the heatmap draws the chosen column: token counts per (frequency bin, L_t bin)
    at.selectbox(key="novelty_metric").set_value("tokens").run()
    assert not at.exception
    heat = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    counts = ev.groupby(["freq_bin", "ctx_bin"]).size().unstack(fill_value=0)
    want = counts.where(counts > 0).to_numpy(np.float64)
    got = np.array([[np.nan if v is None else v for v in r] for r in heat["z"]], np.float64)
    np.testing.assert_array_equal(got, want)
    assert heat["x"] == [infgram.CTX_BIN_LABELS[b] for b in counts.columns]


def test_inspector_highlights_the_overlap(runs_env):
    run_dir = runs_env / "tiny"
    pos, rank, overlap, entry = _read(run_dir, """SELECT pos, rank, overlap, entry FROM neighbors WHERE overlap >= 1
                                                  ORDER BY overlap DESC, pos, rank LIMIT 1""").iloc[0]
    at = open_page("neighbors", pos=int(pos))
    assert not at.error
    shown = at.dataframe[0].value.set_index("rank")
    stored = _read(run_dir, "SELECT rank, overlap FROM neighbors WHERE pos = ? ORDER BY rank", [int(pos)])
    assert shown["overlap"].tolist() == stored["overlap"].tolist()
    assert shown["copy"].tolist() == (stored["overlap"] >= infgram.COPY_MIN_OVERLAP).tolist()
    page = " ".join(str(m.value) for m in at.markdown)
    block = re.search(rf'<div title="neighbour {int(rank)}".*?</div>', page)
    assert block, "the neighbour's context block is missing"
    marked = re.findall(rf'<span title="{re.escape(OVERLAP_TITLE)}"[^>]*>(.*?)</span>', block.group(0))
    assert len(marked) == int(overlap)  # width >= overlap + 4: every overlapping token is shown and marked
    ds = _read(run_dir, "SELECT token_id FROM datastore_tokens ORDER BY pos")["token_id"].to_numpy()
    vocab = dict(_read(run_dir, "SELECT token_id, token FROM vocab").itertuples(index=False))
    want = [html.escape(vocab[t].replace("\n", "⏎")) for t in ds[int(entry) - int(overlap) + 1 : int(entry) + 1]]
    assert marked == want
    # ... and those tokens are the query's last context tokens (the common suffix, from eval_tokens directly)
    ev = _eval(run_dir)
    query = ev.loc[int(pos) - int(overlap) + 1 : int(pos), "context_token_id"].tolist()
    assert query == ds[int(entry) - int(overlap) + 1 : int(entry) + 1].tolist()
    assert ("<b>copy</b>" in block.group(0)) == (overlap >= infgram.COPY_MIN_OVERLAP)
    # the query's own context marks its last L_t tokens (at most the 64 shown)
    n_match = page.count(f'title="{MATCH_TITLE}"')
    assert n_match == min(int(ev.at[int(pos), "ctx_match_len"]), int(pos) + 1, 64)
    assert f"{int(ev.at[int(pos), 'ctx_match_len'])}" in [m.value for m in at.metric]


def test_findings_rows_state_their_numbers(runs_env):
    at = open_page("overview")
    table = at.dataframe[1].value
    assert len(table) == 12
    found_row, rare_row = table.iloc[-2], table.iloc[-1]
    assert found_row["claim"].startswith("kNN-LM's gains come mostly from positions whose context occurs")
    assert rare_row["claim"].startswith("within novel contexts (L_t ≤ 1), rare targets")
    ev = _eval(runs_env / "tiny")
    found = ev["ctx_match_len"] >= infgram.COPY_MIN_OVERLAP
    total = ev["gain"].sum()
    if total > 0:
        share = ev.loc[found, "gain"].sum() / total
        assert f"{100 * found.mean():.1f}% of the {len(ev):,} tokens carry {share:.1%}" in found_row["this run"]
    else:
        assert f"total NLL gain {total:+.1f} nats" in found_row["this run"]
    rare = ev[ev["freq_bin"].between(0, 2) & (ev["ctx_match_len"] <= 1)]
    assert len(rare), "the tiny run has rare targets in novel contexts"
    ppl_lm, ppl_knn = np.exp(rare["nll_lm"].mean()), np.exp(rare["nll_knnlm"].mean())
    assert f"PPL {ppl_lm:.1f} → {ppl_knn:.1f} ({ppl_knn / ppl_lm - 1:+.1%} [no interval])" in rare_row["this run"]
    assert f"n = {len(rare):,} tokens in 1 documents" in rare_row["this run"]
    assert rare_row["verdict"] == "–"  # one document: no interval, so no verdict


@pytest.fixture(scope="module")
def inf_root(tmp_path_factory, mitigated_run) -> Path:
    """The session's tiny run with mitigations (`mit`) and a copy of its database (`mit-copy`) to compare with."""
    root = tmp_path_factory.mktemp("infruns")
    for name in ("mit", "mit-copy"):
        (root / name).mkdir()
        for f in (store.DB_NAME, "manifest.json"):
            shutil.copy(mitigated_run / f, root / name / f)
    return root


@pytest.fixture
def inf_env(inf_root, monkeypatch):
    yield from app_on(inf_root, monkeypatch)


def _infgram_nll(run_dir: Path) -> tuple[pd.DataFrame, float]:
    """eval_tokens with the ∞-gram interpolation's NLL (λ_∞ from the mitigations row), and λ_∞."""
    lam = float(_read(run_dir, "SELECT lam FROM mitigations WHERE variant = 'infgram'").iloc[0, 0])
    ev = _eval(run_dir)
    return ev.assign(nll_inf=-np.log(lam * ev["p_inf"] + (1 - lam) * ev["p_lm"])), lam


def test_infgram_beside_knnlm(inf_env):
    run_dir = inf_env / "mit"
    ev, lam = _infgram_nll(run_dir)
    assert 0 <= lam <= 1
    at = open_page("novelty", run="mit")
    by_ctx = at.dataframe[1].value.set_index("ctx_bin")
    for b, g in ev.groupby("ctx_bin"):
        row = by_ctx.loc[b]
        assert row["ppl_infgram"] == pytest.approx(np.exp(g["nll_inf"].mean()), rel=1e-9)
        assert row["infgram_change"] == pytest.approx(np.exp(g["nll_inf"].mean() - g["nll_lm"].mean()) - 1, rel=1e-9)
        assert row["knnlm_vs_infgram_change"] == pytest.approx(np.exp(g["nll_knnlm"].mean() - g["nll_inf"].mean()) - 1,
                                                               rel=1e-9)
    assert {"infgram_change_ci_lo", "knnlm_vs_infgram"} <= set(by_ctx.columns)

    at = open_page("mitigations", run="mit")
    assert not at.error
    variants = at.dataframe[0].value.set_index("variant")
    assert variants.loc["infgram", "label"] == "∞-gram interpolation (no kNN)"
    assert variants.loc["infgram", "family"] == "∞-gram baseline" and pd.isna(variants.loc["infgram", "τ"])
    assert variants.loc["infgram", "λ"] == f"{lam:g}"
    assert variants.loc["infgram", "evaluation PPL"] == pytest.approx(np.exp(ev["nll_inf"].mean()), rel=1e-9)
    compared = at.dataframe[1].value
    per_bin = compared[compared["variant"] == "infgram"].set_index("freq_bin")
    for b, g in ev.groupby("freq_bin"):
        assert per_bin.loc[b, "ppl"] == pytest.approx(np.exp(g["nll_inf"].mean()), rel=1e-9)
    assert {"delta_ppl_pct_ci_lo", "delta_ppl_pct_ci_hi", "n_docs", "verdict"} <= set(per_bin.columns)
    assert "∞-gram interpolation (no kNN):" in _texts(at)  # its rare / frequent sentence

    at = open_page("compare", run="mit", variant="infgram")
    assert not at.error
    merged = at.dataframe[-1].value.set_index("freq_bin")
    for b, g in ev.groupby("freq_bin"):
        assert merged.loc[b, "ppl_knnlm [mit · infgram]"] == pytest.approx(np.exp(g["nll_inf"].mean()), rel=1e-9)


def _nov(share_ci=(0.6, 0.8), verdict="harms", total_gain=50.0) -> dict:
    """A read.novelty.novelty_findings-shaped dict (the tiny runs are one document: their rows never get an interval)."""
    side = {"n_tokens": 300, "mean_gain": 0.2, "mean_gain_ci_lo": 0.1, "mean_gain_ci_hi": 0.3, "mean_copy_share": 0.4}
    cell = {"n_tokens": 120, "n_docs": 12, "ppl_lm": 900.0, "ppl_knnlm": 990.0, "ppl_change": 0.1,
            "ppl_change_ci_lo": 0.02, "ppl_change_ci_hi": 0.2, "knnlm_vs_lm": verdict}
    return {"min_len": 4, "novel_max_len": 1, "n_tokens": 1000, "total_gain": total_gain, "n_docs": 12,
            "found": {**side, "token_share": 0.3, "share_of_gain": 0.7, "share_of_gain_ci_lo": share_ci[0],
                      "share_of_gain_ci_hi": share_ci[1]},
            "other": {**side, "mean_gain": 0.01}, "novel_rare": cell, "found_rare": {**cell, "knnlm_vs_lm": "helps"}}


def test_novelty_findings_verdicts():
    from knnlm_core import read

    decide = read.novelty.gains_from_found_contexts
    assert decide(_nov((0.6, 0.8))).ok is True
    assert "30.0% of the 1,000 tokens carry 70.0% [60.0%, 80.0%]" in decide(_nov()).numbers
    assert decide(_nov((0.2, 0.45))).ok is False
    undecided = decide(_nov((0.4, 0.8)))
    assert undecided.ok is None and undecided.ns and "includes 50%" in undecided.note
    no_ci = decide(_nov((float("nan"), float("nan"))))
    assert no_ci.ok is None and not no_ci.ns
    assert decide(_nov(total_gain=-3.0)).ok is None and "no net gain" in decide(_nov(total_gain=-3.0)).note
    rare = read.novelty.novel_rare_harmed
    assert rare(_nov(verdict="harms")).ok is True
    assert "PPL 900.0 → 990.0 (+10.0% [+2.0%, +20.0%], harms), n = 120 tokens in 12 documents" in rare(_nov()).numbers
    assert "for contrast L_t ≥ 4" in rare(_nov()).numbers
    assert rare(_nov(verdict="helps")).ok is False
    ns = rare(_nov(verdict="no significant difference"))
    assert ns.ok is None and ns.ns
    assert read.findings.to_frame([ns, rare(_nov())])["verdict"].tolist() == ["≈", "✓"]


def test_heatmap_stars_significant_changes():
    from ui import figures

    cells = pd.DataFrame({"freq_bin": [0, 0, 1], "bin": ["1–9", "1–9", "10–99"], "ctx_bin": [0, 3, 0],
                          "L_t": ["0", "4–7", "0"], "n_tokens": [40, 35, 50], "ppl_change": [0.1, -0.2, 0.01],
                          "ppl_change_ci_lo": [0.05, -0.3, -0.02], "ppl_change_ci_hi": [0.2, -0.1, 0.03]})
    heat = figures.novelty_heatmap(cells, "ppl_change", "t", "+.1%", "lower").data[0]
    assert list(heat.x) == ["0", "4–7"] and list(heat.y) == ["1–9", "10–99"]
    assert [list(r) for r in heat.text] == [["+10.0%*<br>n=40", "-20.0%*<br>n=35"], ["+1.0%<br>n=50", ""]]
    assert heat.colorscale is not None and heat.zmid == 0
