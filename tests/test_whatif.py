"""knnlm_core.whatif: re-scoring from stored neighbours against the run's own p_kNN (a
real run storing all k neighbours in its table, and runs read through their neighbour block:
PPL to 1e-9) and against a per-position loop reference (the re-scoring itself:
tests/test_rescore.py); λ-only changes against direct interpolation on the shipped demo;
exact / approximate / not-available plans; the baseline of a truncated scenario (the run's settings
re-scored from the same neighbours) and per-bin changes against it; the λ editor's bin labels; the
adaptive-λ note; the page on a run with and without its block (shipped runs: tests/test_app_whatif.py)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from knnlm_core import adaptive, knn, neighbours, rescore, store, whatif

REPO = Path(__file__).resolve().parent.parent
DEMO_DB = REPO / "data" / "runs" / "demo" / store.DB_NAME


def _load(run_dir):
    con = store.open_readonly(run_dir / store.DB_NAME)
    try:
        return whatif.load_neighbours(con.cursor()), con.execute("SELECT * FROM run").df().iloc[0]
    finally:
        con.close()


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return _load(tiny_run)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model):
    """A real run that stores all k neighbours (store_neighbors = k = 64)."""
    from conftest import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("full") / "full", tiny_model, store_neighbors=64)


def _reference(data, k, tau, source, weights=None):
    """Loop over positions: p_kNN(target) from the first k stored neighbours."""
    dists = data.dists_pq if source == "pq" else data.dists_exact
    out = np.zeros(len(data.targets))
    for t in range(len(data.targets)):
        v, d = data.nbr_values[t, :k], dists[t, :k].astype(np.float64)
        ok = (v >= 0) & np.isfinite(d)
        if not ok.any():
            continue  # no neighbour: p_kNN = 0
        w = np.exp(-(d[ok] - d[ok].min()) / tau) * (weights[v[ok]] if weights is not None else 1.0)
        out[t] = w[v[ok] == data.targets[t]].sum() / w.sum()
    return out


def test_rescore_reproduces_run_when_all_k_stored(full_run):
    data, run = _load(full_run)
    assert data.n_stored == run["k"]
    p = whatif.rescore(data, int(run["k"]), float(run["temperature"]), run["distance_source"])
    np.testing.assert_allclose(p, data.p_knn_run, rtol=1e-12, atol=1e-15)
    ppl = whatif.overall_ppl(whatif.interpolate(data, float(run["lambda"]), p))
    assert ppl == pytest.approx(float(run["ppl_knnlm"]), rel=1e-9)
    # other k / τ / source are exact too (all k stored): the plan says so
    settings = whatif.run_settings(run.to_dict(), data.n_stored)
    assert whatif.plan(int(run["k"]), float(run["temperature"]), run["distance_source"], settings).runs_own
    other = whatif.plan(8, 3.0, "exact", settings)
    assert other.exact and other.k_used == 8 and not other.runs_own


def test_plan_labels_exact_and_approximate():
    s = whatif.RunSettings(k=1024, tau=10.0, source="pq", lam=0.25, n_stored=16)
    own = whatif.plan(1024, 10.0, "pq", s)
    assert own.runs_own and own.exact and "run's own p_kNN" in own.label
    assert whatif.plan(16, 10.0, "pq", s).exact and whatif.plan(16, 10.0, "pq", s).k_used == 16
    for k, tau, source in [(1024, 5.0, "pq"), (1024, 10.0, "exact"), (17, 10.0, "pq")]:
        p = whatif.plan(k, tau, source, s)
        assert not p.exact and not p.runs_own and p.k_used == 16 and p.label.startswith("approximate")
    none = whatif.plan(1024, 5.0, "pq", whatif.RunSettings(1024, 10.0, "pq", 0.25, 0))
    assert not none.exact and none.k_used == 0 and "only λ" in none.label
    with pytest.raises(ValueError, match="k must be"):
        whatif.plan(1025, 10.0, "pq", s)
    with pytest.raises(ValueError):
        whatif.plan(8, 10.0, "cosine", s)


@pytest.fixture(scope="module")
def demo():
    if not DEMO_DB.is_file():
        pytest.skip("shipped demo run not present")
    con = duckdb.connect(str(DEMO_DB), read_only=True)  # plain read-only DuckDB: independent of store's checks
    try:
        direct = con.execute("SELECT p_lm, p_knn FROM eval_tokens ORDER BY pos").fetchnumpy()
        return whatif.load_neighbours(con.cursor()), con.execute("SELECT * FROM run").df().iloc[0], direct
    finally:
        con.close()


def test_lambda_only_is_exact_on_shipped_demo(demo):
    data, run, direct = demo
    settings = whatif.run_settings(run.to_dict(), data.n_stored)
    assert settings.n_stored < settings.k  # the demo stores 16 of 1024 neighbours
    p = whatif.plan(settings.k, settings.tau, settings.source, settings)
    assert p.runs_own and p.exact
    np.testing.assert_array_equal(data.p_knn_run, direct["p_knn"])
    for lam in (0.0, 0.1, 0.25, 0.5, 0.77, 1.0):
        np.testing.assert_array_equal(whatif.interpolate(data, lam), lam * direct["p_knn"] + (1 - lam) * direct["p_lm"])
    ppl = whatif.overall_ppl(whatif.interpolate(data, settings.lam))
    assert ppl == pytest.approx(float(run["ppl_knnlm"]), rel=1e-9, abs=1e-9)
    # the oracle per-bin λ on the run's own p_kNN can only improve on the run's single λ (on the grid)
    best = whatif.best_lambda_per_bin(data.freq_bin, data.p_lm, data.p_knn_run)
    lam_vec = whatif.lam_per_position(data.freq_bin, best, settings.lam)
    assert whatif.overall_ppl(whatif.interpolate(data, lam_vec)) <= ppl
    assert best == adaptive.oracle_by_bin(data.freq_bin, direct["p_lm"], direct["p_knn"])
    # τ / k changes at the run's k are approximate on the demo (16 of 1024 stored)
    assert not whatif.plan(settings.k, 5.0, "pq", settings).exact


def test_rescore_threads_blocks_and_missing_neighbours(tiny, monkeypatch):
    data, _ = tiny
    rng = np.random.default_rng(0)
    vals = data.nbr_values.copy()
    dq, de = data.dists_pq.copy(), data.dists_exact.copy()
    vals[rng.uniform(size=vals.shape) < 0.2] = -1  # missing neighbours
    de[rng.uniform(size=de.shape) < 0.1] = np.nan  # exact distance unknown
    vals[0] = -1  # a position without any neighbour
    holes = whatif.from_arrays(vals, dq, de, data.targets, data.p_lm, data.p_knn_run, data.freq_bin, data.type_freq)
    assert np.isinf(holes.dists_pq[vals < 0]).all() and not holes.match[vals < 0].any()
    monkeypatch.setattr(rescore, "ROWS", 7)
    for source in ("pq", "exact"):
        ref = _reference(holes, holes.n_stored, 4.0, source)
        for threads in (1, 3):
            got = whatif.rescore(holes, holes.n_stored, 4.0, source, threads=threads)
            np.testing.assert_allclose(got, ref, atol=1e-12)
    assert whatif.rescore(holes, holes.n_stored, 4.0)[0] == 0.0


def test_rescore_matches_loop_reference(tiny):
    data, _ = tiny
    for k, tau, source in [(data.n_stored, 10.0, "pq"), (4, 2.5, "exact"), (1, 10.0, "pq"), (8, 0.1, "pq")]:
        np.testing.assert_allclose(whatif.rescore(data, k, tau, source), _reference(data, k, tau, source), atol=1e-12)


def test_idf_weighting_matches_reference(tiny):
    data, run = tiny
    w = whatif.idf(data.type_freq, int(run["n_entries"]))
    assert np.all(w[data.type_freq > 0] > 0) and np.all(w[data.type_freq == 0] == 0)
    got = whatif.rescore(data, 8, 10.0, "pq", w)
    np.testing.assert_allclose(got, _reference(data, 8, 10.0, "pq", w), atol=1e-12)


def test_rescore_rejects_k_beyond_stored(tiny):
    data, _ = tiny
    with pytest.raises(ValueError, match="k must be"):
        whatif.rescore(data, data.n_stored + 1, 10.0)
    with pytest.raises(ValueError):
        whatif.rescore(data, 1, 10.0, source="cosine")


def test_lambda_per_bin_and_ppl(tiny):
    data, run = tiny
    p = whatif.rescore(data, data.n_stored, 10.0)
    best = whatif.best_lambda_per_bin(data.freq_bin, data.p_lm, p, np.linspace(0, 0.9, 10))
    for b, lam in best.items():
        m = data.freq_bin == b
        nll = [np.mean(-np.log(g * p[m] + (1 - g) * data.p_lm[m])) for g in np.linspace(0, 0.9, 10)]
        assert lam == pytest.approx(np.linspace(0, 0.9, 10)[int(np.argmin(nll))])
    lam_vec = whatif.lam_per_position(data.freq_bin, {int(data.freq_bin[0]): 0.7}, 0.1)
    assert lam_vec[data.freq_bin == data.freq_bin[0]].tolist() == pytest.approx(
        [0.7] * int((data.freq_bin == data.freq_bin[0]).sum())
    )
    assert np.all(lam_vec[data.freq_bin != data.freq_bin[0]] == 0.1)
    table = whatif.ppl_by_bin(data.freq_bin, data.p_lm, data.p_lm)
    assert np.allclose(table["ppl"], table["ppl_lm"])
    assert whatif.overall_ppl(data.p_lm) == pytest.approx(float(run["ppl_lm"]), rel=1e-6)


def _load_block(run_dir):
    con = store.open_readonly(run_dir / store.DB_NAME)
    try:
        block = neighbours.open_block(neighbours.block_dir(run_dir, "eval", "plain"))
        return whatif.load_block(block, con.cursor()), con.execute("SELECT * FROM run").df().iloc[0]
    finally:
        con.close()


@pytest.mark.parametrize("which", ["tiny", "tiny-exact"])
def test_block_reproduces_run_ppl_and_makes_tau_changes_exact(runs_root, which):
    """All k neighbours through the run's neighbour block (the run stores only 16 in its table): at the run's
    k, τ and source the re-scored p_kNN equals the pipeline's float64 softmax (eval_tokens.p_knn) per position
    and the run's PPL, both to 1e-9; a corrupted distance is caught."""
    data, run = _load_block(runs_root / which)
    assert int(run["store_neighbors"]) < int(run["k"]) and isinstance(data.nbr_values, neighbours.Column)
    k, tau, source, lam = int(run["k"]), float(run["temperature"]), run["distance_source"], float(run["lambda"])
    assert data.n_stored == k
    p = whatif.rescore(data, k, tau, source)
    np.testing.assert_allclose(p, data.p_knn_run, rtol=1e-9, atol=0)
    dists = (data.dists_pq if source == "pq" else data.dists_exact)[:]  # the block column, read whole here
    np.testing.assert_allclose(p, knn.p_knn_of(dists, data.nbr_values[:], data.targets, tau), rtol=1e-9, atol=0)
    ppl = whatif.overall_ppl(whatif.interpolate(data, lam, p))
    assert ppl == pytest.approx(float(run["ppl_knnlm"]), rel=1e-9)
    settings = whatif.run_settings(run.to_dict(), data.n_stored, data.sources)
    for other in [whatif.plan(k, 2.0, source, settings), whatif.plan(17, tau, "exact", settings)]:
        assert other.exact and other.k_used == other.k and other.label.startswith("exact: re-scored")
    # the comparison catches one corrupted distance of a position whose target is among its neighbours
    row = int(np.flatnonzero(data.match.any(axis=1) & (data.p_knn_run > 1e-6) & (data.p_knn_run < 0.99))[0])
    bad_d = dists.copy()
    bad_d[row, np.flatnonzero(data.match[row])[0]] += 0.05 * tau  # (a distance may be 0: add, not scale)
    bad = whatif.from_arrays(data.nbr_values[:], bad_d, bad_d, data.targets, data.p_lm, data.p_knn_run,
                             data.freq_bin, data.type_freq)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(whatif.rescore(bad, k, tau, source), data.p_knn_run, rtol=1e-9, atol=0)


def test_a_block_of_another_run_is_refused(runs_root, tiny_run, tmp_path):
    arrays = {n: np.zeros((3, 4), dtype) for n, dtype in neighbours.COLUMNS.items()}
    neighbours.write_shard(tmp_path, 0, 0, **arrays)
    neighbours.finish(tmp_path, [(0, 3)], 4)
    con = store.open_readonly(tiny_run / store.DB_NAME)
    try:
        with pytest.raises(ValueError, match="has 3 rows but the run has"):
            whatif.load_block(neighbours.open_block(tmp_path), con.cursor())
    finally:
        con.close()


def test_plan_without_exact_distances_is_not_available():
    s = whatif.RunSettings(k=1024, tau=10.0, source="pq", lam=0.25, n_stored=1024, sources=("pq",))
    assert whatif.plan(1024, 5.0, "pq", s).exact  # τ at the run's k: all k stored
    p = whatif.plan(1024, 10.0, "exact", s)
    assert not p.exact and not p.runs_own and p.k_used == 0 and p.label.startswith("not available")
    assert "no exact distances" in p.label and "run's own p_kNN" in p.label


@pytest.fixture(scope="module")
def mixed():
    """Random neighbours (S = 200) with missing neighbours, unknown exact distances and a position without
    neighbours; rows 0-299 narrow with one wide row in ten, rows 300-449 very narrow, rows 450-599 very
    wide (distance spreads from far below to far above τ)."""
    rng = np.random.default_rng(3)
    t, s, v = 600, 200, 300
    step = np.r_[np.where(rng.random(300) < 0.1, 1.0, 0.05), np.full(150, 0.002), np.full(150, 20.0)][:, None]
    dq = (rng.uniform(0.0, 40.0, (t, 1)) + np.cumsum(rng.exponential(step, (t, s)), axis=1)).astype(np.float32)
    de = (dq + rng.normal(0.0, 0.3, (t, s))).astype(np.float32)
    targets = rng.integers(0, v, t).astype(np.int32)
    values = np.where(rng.random((t, s)) < 0.1, targets[:, None], rng.integers(0, v, (t, s))).astype(np.int32)
    values[rng.random((t, s)) < 0.05] = knn.PAD
    values[4] = knn.PAD
    de[rng.random((t, s)) < 0.03] = np.nan
    return whatif.from_arrays(values, dq, de, targets, rng.uniform(0.01, 0.5, t), rng.uniform(0.0, 1.0, t),
                              rng.integers(0, 5, t).astype(np.int16), rng.integers(0, 50, v))


def test_rescore_equals_float64_softmax_at_run_settings(mixed):
    """A run's own p_kNN is knn.softmax_weights + p_knn_from_weights in float64 (the search stage):
    re-scoring all k at its τ and source gives it per position and the PPL to 1e-9."""
    for source, tau in [("pq", 5.0), ("exact", 0.7), ("pq", 80.0), ("pq", 0.02)]:
        d = mixed.dists_pq if source == "pq" else mixed.dists_exact
        w, _ = knn.softmax_weights(d, tau, mixed.nbr_values)
        ref = knn.p_knn_from_weights(w, mixed.nbr_values, mixed.targets)
        p = whatif.rescore(mixed, mixed.n_stored, tau, source)
        np.testing.assert_allclose(p, ref, rtol=1e-9, atol=0)
        ppl = whatif.overall_ppl(whatif.interpolate(mixed, 0.25, p))
        assert ppl == pytest.approx(whatif.overall_ppl(whatif.interpolate(mixed, 0.25, ref)), rel=1e-9)


def test_page_reads_the_block(tiny_run, tmp_path, monkeypatch):
    """The What-if page on a run directory with its neighbour block: τ and k changes at any k <= the run's are
    exact, for both distance sources; without the block (a shipped run) they are approximate."""
    import shutil

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    shutil.copytree(tiny_run, tmp_path / "full")
    _, run = _load_block(tmp_path / "full")
    monkeypatch.setenv("KNNLM_RUNS_DIR", str(tmp_path))
    st.cache_data.clear()
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=30)
        at.query_params["run"] = "full"
        at.run()
        at.switch_page("pages/whatif.py")
        at.query_params["tau"] = "2.0"
        at.run()
        texts = " ".join(str(e.value) for kind in (at.caption, at.warning, at.info) for e in kind)
        assert not at.exception and "neighbour block" in texts and "distances: pq, exact)" in texts
        assert f"exact: re-scored from all {int(run['k'])} neighbours" in texts and not at.warning
        at.radio(key="whatif_source").set_value("exact").run()
        texts = " ".join(str(e.value) for kind in (at.caption, at.warning, at.info) for e in kind)
        assert not at.exception and not at.warning and "exact: re-scored" in texts
        shutil.rmtree(tmp_path / "full" / neighbours.ROOT)  # as shipped: the database alone
        st.cache_resource.clear()
        at.run()
        texts = " ".join(str(e.value) for kind in (at.caption, at.warning, at.info) for e in kind)
        assert not at.exception and "neighbors table" in texts and "approximate" in texts
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()


def test_baseline_is_the_run_unless_truncated():
    """A scenario re-scored from fewer neighbours than its k is compared with the run's settings re-scored from
    the same neighbours; one that is the run's own p_kNN or exact (all k stored) with the run itself."""
    s = whatif.RunSettings(k=1024, tau=10.0, source="pq", lam=0.25, n_stored=16)
    for k, tau, source in [(1024, 10.5, "pq"), (1024, 10.0, "exact"), (17, 10.0, "pq")]:
        p = whatif.plan(k, tau, source, s)
        b = whatif.baseline_for(k, p.k_used, s)
        assert (b.name, b.k_used) == ("run@16", 16) and "re-scored from the same 16 neighbours" in b.label
    for k, tau, source in [(1024, 10.0, "pq"), (16, 10.5, "pq"), (3, 2.0, "exact")]:
        p = whatif.plan(k, tau, source, s)
        assert whatif.baseline_for(k, p.k_used, s) == whatif.baseline_for(1, 0, s)
        assert whatif.baseline_for(k, p.k_used, s).name == whatif.RUN
    none = whatif.RunSettings(1024, 10.0, "pq", 0.25, 1024, ("pq",))  # source not stored: the run's own p_kNN
    assert whatif.baseline_for(1024, whatif.plan(1024, 10.0, "exact", none).k_used, none).name == whatif.RUN


def test_scenario_table_changes_against_a_truncated_baseline(mixed):
    """change_<name> against an extra baseline (and against the run) equals exp(mean NLL difference) - 1 per bin,
    from plain numpy; the baseline gets its own ppl_ column; an edited baseline is told apart."""
    rng = np.random.default_rng(1)
    doc = rng.integers(0, 6, len(mixed.targets))
    bins = np.unique(mixed.freq_bin)
    run_bins = pd.DataFrame({"freq_bin": bins, "bin": [str(b) for b in bins],
                             "n_tokens": [int((mixed.freq_bin == b).sum()) for b in bins]})
    settings = whatif.RunSettings(k=400, tau=5.0, source="pq", lam=0.25, n_stored=mixed.n_stored)
    base = whatif.baseline_for(400, mixed.n_stored, settings)
    p_base = whatif.baseline_p(mixed, base, settings)
    p_new = whatif.interpolate(mixed, 0.25, whatif.rescore(mixed, mixed.n_stored, 6.0, "pq"))
    table = whatif.scenario_table(run_bins, mixed, {"a": p_new, "b": p_new}, doc, 6, 0.25, {base.name: p_base},
                                  {"a": base.name})
    assert {f"ppl_{base.name}", "a_vs_run@200", "b_vs_run"} <= set(table.columns)

    def change(p, q):
        return [np.exp(np.mean(np.log(q[mixed.freq_bin == b]) - np.log(p[mixed.freq_bin == b]))) - 1 for b in bins]

    run_p = mixed.p_lm * 0.75 + 0.25 * mixed.p_knn_run
    np.testing.assert_allclose(table["change_a"], change(p_new, p_base), rtol=1e-9)
    np.testing.assert_allclose(table["change_b"], change(p_new, run_p), rtol=1e-9)
    np.testing.assert_allclose(table[f"ppl_{base.name}"],
                               [np.exp(-np.mean(np.log(p_base[mixed.freq_bin == b]))) for b in bins], rtol=1e-9)
    with pytest.raises(AssertionError):  # the run as baseline is a different number
        np.testing.assert_allclose(table["change_a"], change(p_new, run_p), rtol=1e-9)


def test_lambda_editor_shows_labels_and_maps_them_back():
    best = {-1: 0.0, 0: 0.1, 3: 0.25}
    frame = whatif.lam_editor_frame(best)
    assert list(frame["bin"]) == ["unseen", "1–9", "1,000–9,999"] and list(frame["lam"]) == [0.0, 0.1, 0.25]
    assert whatif.lams_from_editor(frame, best) == best
    edited = frame.assign(lam=[0.5, np.nan, 7.0])  # a cleared cell and an out-of-range one keep the pre-filled λ
    assert whatif.lams_from_editor(edited, best) == {-1: 0.5, 0: 0.1, 3: 0.25}


def test_adaptive_note_from_the_runs_tables():
    rows = pd.DataFrame({"variant": ["plain", "adaptive-nn"], "label": ["plain", "adaptive λ by nn"],
                         "lam_column": [None, "lam_nn"], "ppl": [212.48, 1211.9667]})
    note = whatif.adaptive_note(rows, 212.48, "`valid.gz`", 19_999)
    assert "PPL 1,211.97 (adaptive λ by nn)" in note and "`valid.gz`, 19,999 tokens" in note and "does not" not in note
    assert "does not have" in whatif.adaptive_note(None, 212.48, "", 0)
    assert "no adaptive λ variant" in whatif.adaptive_note(rows.iloc[:1], 212.48, "`v`", 5)
