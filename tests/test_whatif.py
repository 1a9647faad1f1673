"""knnlm_core.whatif: re-scoring from stored neighbours against the run's own p_kNN (a
real run storing all k neighbours, from its table and from the side file: PPL to 1e-9) and against
a per-position loop reference (the re-scoring itself: tests/test_rescore.py);
the side file (round trip, atomic write, row count); λ-only changes against direct
interpolation on the shipped demo; exact / approximate / not-available plans; the page on a
run with a side file."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pytest

from knnlm_core import adaptive, knn, rescore, store, whatif

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
    np.testing.assert_array_equal(whatif.p_knn_for(data, other, 3.0, "exact"), whatif.rescore(data, 8, 3.0, "exact"))


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
    np.testing.assert_array_equal(whatif.p_knn_for(data, p, settings.tau, settings.source), direct["p_knn"])
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


def test_choose_tau_is_the_grid_minimiser(tiny):
    data, run = tiny
    taus = np.array([0.5, 2.0, 10.0, 50.0])
    best, ppl = whatif.choose_tau(data, taus, 0.25, k=8, source="exact")
    want = [whatif.overall_ppl(0.25 * _reference(data, 8, t, "exact") + 0.75 * data.p_lm) for t in taus]
    np.testing.assert_allclose(ppl, want, rtol=1e-12)
    assert best == taus[int(np.argmin(want))]


def _side_arrays(t: int, k: int, seed: int = 0):
    """(values, dists_pq, dists_exact) (t, k) as a run writes them: ascending PQ distances, tails padded
    with value -1 / inf, one position without neighbours, one unknown exact distance."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 1000, (t, k)).astype(np.int32)
    dq = np.sort(rng.uniform(1.0, 50.0, (t, k)).astype(np.float32), axis=1)
    de = (dq + rng.normal(0.0, 0.1, (t, k))).astype(np.float32)
    values[:, -2:][rng.random((t, 2)) < 0.3] = knn.PAD
    values[1] = knn.PAD
    dq[values == knn.PAD] = np.inf
    de[values == knn.PAD] = np.inf
    de[2, 3] = np.inf
    return values, dq, de


@pytest.fixture
def run_cursor(tiny_run):
    con = store.open_readonly(tiny_run / store.DB_NAME)
    try:
        yield con.cursor()
    finally:
        con.close()


def test_side_file_round_trip(run_cursor, tmp_path):
    cur = run_cursor
    table = whatif.load_neighbours(cur)
    values, dq, de = _side_arrays(len(table.targets), 24)
    side = tmp_path / whatif.ALL_NEIGHBOURS
    whatif.save_all_neighbours(side, values, dq, de)
    assert os.listdir(tmp_path) == [whatif.ALL_NEIGHBOURS]  # no temporary file left
    data = whatif.load_all_neighbours(side, cur)
    assert data.n_stored == 24 and data.sources == whatif.SOURCES
    for got, want in [(data.nbr_values, values), (data.dists_pq, dq), (data.dists_exact, de)]:
        np.testing.assert_array_equal(got, want)  # -1 and inf padding included
        assert got.dtype == want.dtype
    for col in ("targets", "p_lm", "p_knn_run", "freq_bin"):  # the run's per-position columns, as the table path
        np.testing.assert_array_equal(getattr(data, col), getattr(table, col))
    # the file: long format in (pos, rank) order, typed columns, ZSTD
    types = cur.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(side)]).fetchall()
    assert [(c[0], c[1]) for c in types] == [("pos", "INTEGER"), ("rank", "SMALLINT"), ("value", "INTEGER"),
                                             ("dist_pq", "FLOAT"), ("dist_exact", "FLOAT")]
    order = cur.execute("SELECT pos, rank FROM read_parquet(?)", [str(side)]).fetchnumpy()
    t = len(values)
    np.testing.assert_array_equal(order["pos"], np.repeat(np.arange(t), 24))
    np.testing.assert_array_equal(order["rank"], np.tile(np.arange(1, 25), t))
    codecs = cur.execute("SELECT DISTINCT compression FROM parquet_metadata(?)", [str(side)]).fetchall()
    assert codecs == [("ZSTD",)]
    # the comparison catches one corrupted value
    bad = values.copy()
    bad[5, 7] += 1
    whatif.save_all_neighbours(side, bad, dq, de)
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(whatif.load_all_neighbours(side, cur).nbr_values, values)
    # without exact distances: NULL in the file, +inf when loaded, and "exact" is not offered
    whatif.save_all_neighbours(side, values, dq, None)
    assert cur.execute("SELECT count(dist_exact) FROM read_parquet(?)", [str(side)]).fetchone()[0] == 0
    no_exact = whatif.load_all_neighbours(side, cur)
    assert no_exact.sources == ("pq",) and np.isinf(no_exact.dists_exact).all()
    np.testing.assert_array_equal(no_exact.dists_pq, dq)
    with pytest.raises(ValueError, match="source must be one of"):
        whatif.rescore(no_exact, 4, 10.0, "exact")


def test_side_file_in_another_order_is_read_by_pos_and_rank(run_cursor, tmp_path):
    cur = run_cursor
    values, dq, de = _side_arrays(int(cur.execute("SELECT count(*) FROM eval_tokens").fetchone()[0]), 6, seed=1)
    side, shuffled = tmp_path / "in_order.parquet", tmp_path / whatif.ALL_NEIGHBOURS
    whatif.save_all_neighbours(side, values, dq, de)
    duckdb.execute(f"COPY (SELECT * FROM read_parquet('{side}') ORDER BY hash(pos * 7 + rank)) TO '{shuffled}' "
                   "(FORMAT parquet)")
    data = whatif.load_all_neighbours(shuffled, cur)
    np.testing.assert_array_equal(data.nbr_values, values)
    np.testing.assert_array_equal(data.dists_exact, de)


def test_side_file_interrupted_write_leaves_no_file_and_keeps_the_old(run_cursor, tmp_path, monkeypatch):
    cur = run_cursor
    t = int(cur.execute("SELECT count(*) FROM eval_tokens").fetchone()[0])
    side = tmp_path / whatif.ALL_NEIGHBOURS
    written = []

    def interrupted(src, dst):  # the temporary file is complete, the rename never happens
        written.append(Path(src).parent == Path(dst).parent and Path(src).stat().st_size > 0)
        raise KeyboardInterrupt

    values, dq, de = _side_arrays(t, 8)
    monkeypatch.setattr(whatif.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        whatif.save_all_neighbours(side, values, dq, de)
    assert written == [True] and os.listdir(tmp_path) == []
    monkeypatch.undo()
    whatif.save_all_neighbours(side, values, dq, de)  # the file a reader may hold
    before = side.read_bytes()
    monkeypatch.setattr(whatif.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        whatif.save_all_neighbours(side, *_side_arrays(t, 8, seed=2))
    assert side.read_bytes() == before and os.listdir(tmp_path) == [whatif.ALL_NEIGHBOURS]
    np.testing.assert_array_equal(whatif.load_all_neighbours(side, cur).nbr_values, values)


def test_side_file_row_count_must_match_the_run(run_cursor, tmp_path):
    cur = run_cursor
    t = int(cur.execute("SELECT count(*) FROM eval_tokens").fetchone()[0])
    side = tmp_path / whatif.ALL_NEIGHBOURS
    values, dq, de = _side_arrays(t - 1, 8)
    whatif.save_all_neighbours(side, values, dq, de)
    with pytest.raises(ValueError, match=rf"{(t - 1) * 8:,} rows .* run has {t:,} positions: expected T x k"):
        whatif.load_all_neighbours(side, cur)


def test_side_file_reproduces_run_ppl_and_makes_tau_changes_exact(full_run, tmp_path):
    """All k neighbours through the side file: at the run's k, τ and source the re-scored p_kNN equals the
    pipeline's float64 softmax (eval_tokens.p_knn) per position and the run's PPL, both to 1e-9."""
    table, run = _load(full_run)
    side = tmp_path / whatif.ALL_NEIGHBOURS
    whatif.save_all_neighbours(side, table.nbr_values, table.dists_pq, table.dists_exact)
    con = store.open_readonly(full_run / store.DB_NAME)
    try:
        data = whatif.load_all_neighbours(side, con.cursor())
    finally:
        con.close()
    k, tau, source, lam = int(run["k"]), float(run["temperature"]), run["distance_source"], float(run["lambda"])
    assert data.n_stored == k
    p = whatif.rescore(data, k, tau, source)
    np.testing.assert_allclose(p, data.p_knn_run, rtol=1e-9, atol=0)
    dists = data.dists_pq if source == "pq" else data.dists_exact
    np.testing.assert_allclose(p, knn.p_knn_of(dists, data.nbr_values, data.targets, tau), rtol=1e-9, atol=0)
    ppl = whatif.overall_ppl(whatif.interpolate(data, lam, p))
    assert ppl == pytest.approx(float(run["ppl_knnlm"]), rel=1e-9)
    settings = whatif.run_settings(run.to_dict(), data.n_stored, data.sources)
    for other in [whatif.plan(k, 2.0, source, settings), whatif.plan(17, tau, "exact", settings)]:
        assert other.exact and other.k_used == other.k and other.label.startswith("exact: re-scored")
    # the comparison catches one corrupted distance of a position whose target is among its neighbours
    row = int(np.flatnonzero(data.match.any(axis=1) & (data.p_knn_run < 0.99))[0])
    bad_d = dists.copy()
    bad_d[row, np.flatnonzero(data.match[row])[0]] *= 1.001
    bad = whatif.from_arrays(data.nbr_values, bad_d, bad_d, data.targets, data.p_lm, data.p_knn_run,
                             data.freq_bin, data.type_freq)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(whatif.rescore(bad, k, tau, "pq"), data.p_knn_run, rtol=1e-9, atol=0)


def test_plan_without_exact_distances_is_not_available():
    s = whatif.RunSettings(k=1024, tau=10.0, source="pq", lam=0.25, n_stored=1024, sources=("pq",))
    assert whatif.plan(1024, 5.0, "pq", s).exact  # τ at the run's k: all k stored
    p = whatif.plan(1024, 10.0, "exact", s)
    assert not p.exact and not p.runs_own and p.k_used == 0 and p.label.startswith("not available")
    assert "no exact distances" in p.label and "run's own p_kNN" in p.label
    data = whatif.from_arrays(np.zeros((3, 2), np.int32), np.ones((3, 2)), np.full((3, 2), np.inf), np.zeros(3),
                              np.full(3, 0.5), np.full(3, 0.25), np.zeros(3), np.ones(1), sources=("pq",))
    np.testing.assert_array_equal(whatif.p_knn_for(data, p, 10.0, "exact"), data.p_knn_run)


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


def test_page_reads_the_side_file(full_run, tmp_path, monkeypatch):
    """The What-if page on a run with neighbors_all.parquet (no exact distances): τ changes at the run's k are
    exact, the exact source is labelled not available."""
    import shutil

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    shutil.copytree(full_run, tmp_path / "full")
    table, run = _load(tmp_path / "full")
    assert run["distance_source"] == "pq"
    whatif.save_all_neighbours(tmp_path / "full" / whatif.ALL_NEIGHBOURS, table.nbr_values, table.dists_pq, None)
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
        assert not at.exception and whatif.ALL_NEIGHBOURS in texts and "distances: pq)" in texts
        assert f"exact: re-scored from all {int(run['k'])} neighbours" in texts and not at.warning
        at.radio(key="whatif_source").set_value("exact").run()
        assert not at.exception and at.warning and "not available" in at.warning[0].value
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()
