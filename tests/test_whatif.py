"""knnlm_core.whatif: re-scoring from stored neighbours against the run's own p_kNN (a
real run storing all k neighbours: PPL to 1e-9) and against a per-position loop reference;
λ-only changes against direct interpolation on the shipped demo; exact / approximate plans."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest

from knnlm_core import adaptive, store, whatif

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
    monkeypatch.setattr(whatif, "ROWS", 7)
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
