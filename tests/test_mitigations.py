"""knnlm_core.mitigations and the mitigation queries (SPEC §9) on a hand-made DuckDB file:
per-bin summaries against a numpy recomputation, the plain variant against bin_summary,
column names from the mitigations row validated (no SQL injection), verdicts on a hand case,
and the oracle per-bin λ against a brute-force grid search."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from knnlm_core import adaptive, mitigations, read, store
from knnlm_core import bootstrap as bs

T = 600
BINS = np.array([-1, 0, 1, 2, 3, 4])
LAM = 0.25
N_DOCS = 12  # documents of the synthetic evaluation (SPEC §11 intervals)


def _tables(seed: int = 0) -> dict[str, pd.DataFrame]:
    """eval_tokens / token_types with the columns the queries read, and the three mitigation tables."""
    rng = np.random.default_rng(seed)
    freq_bin = rng.choice(BINS, size=T).astype(np.int16)
    p_lm = rng.uniform(1e-4, 0.9, T)
    p_knn = np.where(rng.random(T) < 0.3, 0.0, rng.uniform(0, 1, T))  # p_kNN = 0 where no neighbour carries y
    p_knnlm = LAM * p_knn + (1 - LAM) * p_lm
    token_id = rng.integers(0, 50, T).astype(np.int32)
    eval_tokens = pd.DataFrame({
        "pos": np.arange(T, dtype=np.int32), "token_id": token_id, "freq_bin": freq_bin, "p_lm": p_lm, "p_knn": p_knn,
        "p_knnlm": p_knnlm, "nll_lm": -np.log(p_lm), "nll_knnlm": -np.log(p_knnlm),
        "gain": np.log(p_knnlm) - np.log(p_lm), "hit_1": rng.random(T) < 0.5, "n_target": rng.integers(0, 2, T),
        "query_pq_error": rng.random(T), "doc_id": (np.arange(T) * N_DOCS // T).astype(np.int32),
    })
    types = eval_tokens.groupby("token_id", as_index=False)["freq_bin"].first()
    types = types.assign(freq=10 ** types["freq_bin"].clip(lower=0), cv=0.5, contamination=0.5, pq_error_mean=1.0)
    zipf = rng.uniform(0, 1, T).astype(np.float32)
    tokens = pd.DataFrame({
        "pos": np.arange(T, dtype=np.int32),
        "p_knn_tau": rng.uniform(0, 1, T).astype(np.float32),
        "p_knn_zipfian": pd.array(np.where(rng.random(T) < 0.1, np.nan, zipf), dtype="Float32"),  # some NULL
        "lam_nn": rng.choice([0.0, 0.1, 0.4, 1.0], T),
    })
    variants = pd.DataFrame({
        "variant": ["tau", "plain", "adaptive-nn", "zipfian"],
        "label": ["τ from validation", "plain", "adaptive λ (NN distance)", "Zipfian whitening"],
        "family": ["temperature", "baseline", "adaptive λ", "whitening"],
        "tau": [3.0, 10.0, 10.0, 512.0], "lam": [LAM, LAM, np.nan, LAM],
        "p_knn_column": ["p_knn_tau", None, None, "p_knn_zipfian"], "lam_column": [None, None, "lam_nn", None],
        "eps": [np.nan, np.nan, np.nan, 1e-3], "valid_ppl_lm": 100.0, "valid_ppl": [80.0, 90.0, 85.0, 88.0],
        "ppl": 1.0, "notes": "hand-made",
    })
    rules = pd.DataFrame({"variant": "adaptive-nn", "bin": [0, 1], "lo": [-np.inf, 5.0], "hi": [5.0, np.inf],
                          "lam": [0.4, 0.1], "n_valid": [10, 10]})
    return {"eval_tokens": eval_tokens, "token_types": types, "mitigations": variants,
            "run": pd.DataFrame({"n_docs": [N_DOCS], "lambda": [LAM]}),
            "mitigation_tokens": tokens, "adaptive_lambda": rules}


def _write(path, tables: dict[str, pd.DataFrame]) -> None:
    """eval_tokens and token_types as plain tables; the mitigation relations through the real writer."""
    con = duckdb.connect(str(path))
    if "mitigations" in tables:
        store.write_mitigations(con, tables)
    for name, df in tables.items():
        if name in store.OPTIONAL_TABLES:
            continue
        con.register("src", df)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM src")
        con.unregister("src")
    con.close()


@pytest.fixture
def db(tmp_path):
    tables = _tables()
    _write(tmp_path / "m.duckdb", tables)
    con = duckdb.connect(str(tmp_path / "m.duckdb"), read_only=True)
    yield con.cursor(), tables
    con.close()


def _reference(tables: dict, variant: str) -> pd.DataFrame:
    """Per-bin summary of a variant with numpy (float32 stored columns read as float64)."""
    ev, tok = tables["eval_tokens"], tables["mitigation_tokens"]
    row = tables["mitigations"].set_index("variant").loc[variant]
    p_knn = ev["p_knn"].to_numpy()
    if pd.notna(row["p_knn_column"]):
        col = tok[row["p_knn_column"]].to_numpy(dtype=np.float64, na_value=np.nan)
        p_knn = np.where(np.isnan(col), p_knn, col)
    lam = tok[row["lam_column"]].to_numpy(np.float64) if pd.notna(row["lam_column"]) else np.full(len(ev), row["lam"])
    with np.errstate(divide="ignore"):  # λ = 1 where p_kNN = 0: an infinite NLL, in SQL too
        nll_lm, nll = -np.log(ev["p_lm"].to_numpy()), -np.log(lam * p_knn + (1 - lam) * ev["p_lm"].to_numpy())
    rows = []
    for b in np.unique(ev["freq_bin"]):
        m = ev["freq_bin"].to_numpy() == b
        rows.append({"freq_bin": b, "n_tokens": m.sum(), "ppl_lm": np.exp(nll_lm[m].mean()), "ppl": np.exp(nll[m].mean()),
                     "share_harmed": (nll[m] > nll_lm[m]).mean(), "mean_p_knn": p_knn[m].mean(),
                     "mean_lambda": lam[m].mean(), "mean_gain": (nll_lm[m] - nll[m]).mean()})
    return pd.DataFrame(rows)


def test_tables_are_detected(db, tmp_path):
    cur, _ = db
    assert read.mitigations.has_mitigations(cur)
    plain_only = {k: v for k, v in _tables().items() if k in ("eval_tokens", "token_types")}
    _write(tmp_path / "plain.duckdb", plain_only)
    con = duckdb.connect(str(tmp_path / "plain.duckdb"), read_only=True)
    assert not read.mitigations.has_mitigations(con.cursor())
    con.close()
    variants = read.mitigations.mitigation_variants(cur)
    assert list(variants["variant"]) == ["plain", "tau", "adaptive-nn", "zipfian"]  # plain first, then stored order
    assert list(read.mitigations.adaptive_rules(cur)["lam"]) == [0.4, 0.1]


@pytest.mark.parametrize("variant", ["plain", "tau", "adaptive-nn", "zipfian"])
def test_variant_bin_summary_matches_numpy(db, variant):
    cur, tables = db
    got = read.mitigations.variant_bin_summary(cur, variant)
    want = _reference(tables, variant)
    assert list(got["freq_bin"]) == list(want["freq_bin"]) and "bin" in got
    for col in ("n_tokens", "ppl_lm", "ppl", "share_harmed", "mean_p_knn", "mean_lambda", "mean_gain"):
        np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), rtol=1e-9, atol=1e-12,
                                   err_msg=col)
    total = read.mitigations.variant_overall(cur, variant)
    n = want["n_tokens"].to_numpy(float)
    assert total["n_tokens"] == T
    assert np.isclose(total["ppl"], np.exp((n * np.log(want["ppl"])).sum() / n.sum()), rtol=1e-9)


def test_plain_variant_equals_bin_summary(db):
    cur, tables = db
    plain = read.mitigations.variant_bin_summary(cur, "plain")
    run = read.bins.bin_summary(cur, 1)
    np.testing.assert_allclose(plain["ppl"], run["ppl_knnlm"], rtol=1e-9)
    np.testing.assert_allclose(plain["share_harmed"], run["share_harmed"], rtol=1e-9)
    np.testing.assert_allclose(plain["mean_gain"], run["mean_gain"], rtol=1e-9, atol=1e-12)
    ppl_run = np.exp(tables["eval_tokens"]["nll_knnlm"].mean())
    assert np.isclose(read.mitigations.variant_overall(cur, "plain")["ppl"], ppl_run, rtol=1e-9)


def test_bad_column_names_are_rejected_not_run(tmp_path):
    tables = _tables()
    evil = 'p_knn_tau" FROM eval_tokens; DROP TABLE eval_tokens; --'
    tables["mitigations"].loc[tables["mitigations"]["variant"] == "tau", "p_knn_column"] = evil
    tables["mitigations"].loc[tables["mitigations"]["variant"] == "adaptive-nn", "lam_column"] = "lam_gone"
    _write(tmp_path / "bad.duckdb", tables)
    con = duckdb.connect(str(tmp_path / "bad.duckdb"))
    cur = con.cursor()
    with pytest.raises(read.mitigations.MitigationError, match="p_knn_column .* is not a column of mitigation_tokens"):
        read.mitigations.variant_bin_summary(cur, "tau")
    with pytest.raises(read.mitigations.MitigationError, match="lam_column = 'lam_gone'"):
        read.mitigations.variant_overall(cur, "adaptive-nn")
    with pytest.raises(read.mitigations.MitigationError, match="unknown mitigation variant"):
        read.mitigations.variant_bin_summary(cur, "plain' OR TRUE --")
    assert cur.execute("SELECT count(*) FROM eval_tokens").fetchone()[0] == T
    assert len(read.mitigations.variant_bin_summary(cur, "plain")) == len(BINS)  # the good rows still work
    con.close()


def _summary(ppl, share, bins=(0, 2, 4), n=(10, 10, 100)) -> pd.DataFrame:
    return pd.DataFrame({"freq_bin": list(bins), "bin": [str(b) for b in bins], "n_tokens": list(n),
                         "ppl_lm": 100.0, "ppl": list(ppl), "share_harmed": list(share)})


def test_compare_to_plain_hand_case():
    out = mitigations.compare_to_plain({
        "plain": _summary([100.0, 50.0, 10.0], [0.5, 0.4, 0.2]),
        "v": _summary([90.0, 50.2, 11.0], [0.3, 0.4, 0.3]),  # -10%, +0.4% (within ±0.5%), +10%
    })
    v = out[out["variant"] == "v"].set_index("freq_bin")
    assert list(v["verdict"]) == ["helps", "same", "hurts"]
    np.testing.assert_allclose(v["delta_ppl"], [-10.0, 0.2, 1.0])
    np.testing.assert_allclose(v["delta_ppl_pct"], [-10.0, 0.4, 10.0])
    np.testing.assert_allclose(v["delta_share_harmed"], [-0.2, 0.0, 0.1], atol=1e-12)
    assert set(out.loc[out["variant"] == "plain", "verdict"]) == {"baseline"}
    assert (out.loc[out["variant"] == "plain", "delta_ppl"] == 0).all()
    # rare bins pooled over equal counts: sqrt(90 * 50.2) / sqrt(100 * 50) - 1 = -4.94%
    line = mitigations.rare_bin_verdict(out, "v", "my variant")
    assert line == ("my variant: helps the rare bins (freq < 1,000): PPL -4.9%; "
                    "costs the frequent bins (≥ 10k) 10.0%.")
    same = mitigations.compare_to_plain({"plain": _summary([100, 50, 10], [0, 0, 0], bins=(0, 1, 3)),
                                         "w": _summary([100.1, 50, 10], [0, 0, 0], bins=(0, 1, 3))})
    assert mitigations.rare_bin_verdict(same, "w") == (
        "w: leaves the rare bins (freq < 1,000) about the same: PPL +0.0%; "
        "no frequent-bin (freq ≥ 10k) tokens in this run.")
    with pytest.raises(ValueError, match="plain"):
        mitigations.compare_to_plain({"v": _summary([1, 1, 1], [0, 0, 0])})


def test_oracle_row_is_the_best_lambda_per_bin(db):
    cur, tables = db
    ev = tables["eval_tokens"]
    got = read.mitigations.oracle_bin_summary(cur)
    lam_by_bin = adaptive.oracle_by_bin(ev["freq_bin"], ev["p_lm"], ev["p_knn"])
    assert dict(zip(got["freq_bin"], got["lam"])) == lam_by_bin
    for b, grp in ev.groupby("freq_bin"):
        with np.errstate(divide="ignore"):  # λ = 1 where p_kNN = 0
            ppl = [np.exp(np.mean(-np.log(g * grp["p_knn"] + (1 - g) * grp["p_lm"]))) for g in adaptive.default_grid()]
        row = got.set_index("freq_bin").loc[b]
        assert np.isclose(row["ppl"], min(ppl), rtol=1e-9) and np.isclose(row["mean_lambda"], row["lam"], rtol=1e-12)
    compared = mitigations.compare_to_plain({"plain": read.mitigations.variant_bin_summary(cur, "plain"),
                                             adaptive.ORACLE_LABEL: got})
    oracle = compared[compared["variant"] == "oracle (upper bound)"]
    assert (oracle["delta_ppl"] <= 1e-9).all()  # λ = the run's is on the grid: the oracle is never worse
    lam = ev["freq_bin"].map(lam_by_bin).to_numpy()
    want = np.exp(np.mean(-np.log(lam * ev["p_knn"] + (1 - lam) * ev["p_lm"])))
    assert np.isclose(mitigations.overall_from_bins(got)["ppl"], want, rtol=1e-9)


def test_variant_run_summary_and_variants_table(db):
    """variant_run_summary: bin_summary with every kNN-LM figure, interval and verdict the variant's (numpy
    reference; the intervals against bootstrap.intervals over numpy per-document sums), the run's own kept."""
    cur, tables = db
    run = read.bins.bin_summary(cur, 1)
    before = run.copy()
    for variant in ("tau", "adaptive-nn", "zipfian"):
        out = read.mitigations.variant_run_summary(cur, 1, variant)
        pd.testing.assert_frame_equal(read.bins.bin_summary(cur, 1), before)  # the run's table is not modified
        want = _reference(tables, variant)
        np.testing.assert_allclose(out["ppl_knnlm"], want["ppl"], rtol=1e-9)
        np.testing.assert_allclose(out["ppl_change"], want["ppl"] / want["ppl_lm"] - 1, rtol=1e-9, atol=1e-12)
        for col in ("share_harmed", "mean_p_knn", "mean_gain"):
            np.testing.assert_allclose(out[col], want[col], rtol=1e-9, atol=1e-12, err_msg=f"{variant} {col}")
        for col in ("ppl_lm", "hit_1", "hit_1_ci_lo", "mean_contamination", "n_docs"):  # the LM's and the run's own
            np.testing.assert_array_equal(out[col], run[col])
        if variant == "adaptive-nn":  # λ = 1 where p_kNN = 0: an infinite NLL in every bin, so no interval
            assert out["ppl_change_ci_lo"].isna().all() and (out["knnlm_vs_lm"] == "no interval").all()
            continue
        assert not np.allclose(out["ppl_change_ci_lo"], run["ppl_change_ci_lo"])  # not the plain run's interval
        assert list(out["knnlm_vs_lm"]) == [bs.verdict(lo, hi) for lo, hi in
                                            zip(out["ppl_change_ci_lo"], out["ppl_change_ci_hi"])]
        assert list(out["vs_plain"]) == [bs.verdict(lo, hi, "helps", "hurts") for lo, hi in
                                         zip(out["change_vs_plain_ci_lo"], out["change_vs_plain_ci_hi"])]
        assert out["ppl_change_ci_lo"].notna().any() and (out["ppl_change_ci_lo"] <= out["ppl_change"] + 1e-12).all()
    variants = read.mitigations.mitigation_variants(cur)
    totals = {v: read.mitigations.variant_overall(cur, v) for v in variants["variant"]}
    table = mitigations.variants_table(variants, totals, read.mitigations.oracle_bin_summary(cur), 10.0)
    assert list(table["λ"]) == ["0.25", "0.25", "per position", "0.25", "per frequency bin"]
    assert list(table["variant"]) == ["plain", "tau", "adaptive-nn", "zipfian", adaptive.ORACLE_LABEL]
    assert table["Δ PPL vs plain (%)"].iloc[0] == 0.0 and table["Δ PPL vs plain (%)"].iloc[-1] <= 1e-9


def test_change_figure_has_one_line_per_variant_on_ordered_bins():
    from ui import figures

    compared = mitigations.compare_to_plain({
        "plain": _summary([100.0, 50.0, 10.0], [0.5, 0.4, 0.2]),
        "v": _summary([90.0, 50.2, 11.0], [0.3, 0.4, 0.3]),
        adaptive.ORACLE_LABEL: _summary([95.0, 49.0, 9.0], [0.4, 0.4, 0.2]),
    })
    fig = figures.variant_change_by_bin(compared, {"v": "my variant"})
    assert [t.name for t in fig.data] == ["my variant", adaptive.ORACLE_LABEL]  # plain is the zero line
    np.testing.assert_allclose(fig.data[0].y, [-10.0, 0.4, 10.0])
    assert list(fig.layout.xaxis.categoryarray) == ["0", "2", "4"]


def test_lambda_storage_is_exact_and_refuses_off_grid_values(tmp_path):
    """λ is stored as integer percent behind a view: the view gives back the very doubles, and a λ that is
    not on the 0.01 grid is refused rather than rounded."""
    tables = _tables()
    _write(tmp_path / "ok.duckdb", tables)
    con = duckdb.connect(str(tmp_path / "ok.duckdb"), read_only=True)
    got = con.execute("SELECT lam_nn FROM mitigation_tokens ORDER BY pos").fetchnumpy()["lam_nn"]
    con.close()
    np.testing.assert_array_equal(got, tables["mitigation_tokens"]["lam_nn"].to_numpy())
    tables["mitigation_tokens"].loc[3, "lam_nn"] = 0.123
    with pytest.raises(ValueError, match="0.01 grid"):
        _write(tmp_path / "bad.duckdb", tables)
