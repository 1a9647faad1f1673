"""knnlm_core.whatif: re-scoring from stored neighbours against the run's own p_kNN (a
real run storing all k neighbours) and against a per-position loop reference."""

from __future__ import annotations

import numpy as np
import pytest

from knnlm_core import store, whatif


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
        ok = v >= 0
        w = np.exp(-(d[ok] - d[ok].min()) / tau) * (weights[v[ok]] if weights is not None else 1.0)
        out[t] = w[v[ok] == data.targets[t]].sum() / w.sum()
    return out


def test_rescore_reproduces_run_when_all_k_stored(full_run):
    data, run = _load(full_run)
    assert data.n_stored == run["k"]
    p = whatif.rescore(data, int(run["k"]), float(run["temperature"]), run["distance_source"])
    np.testing.assert_allclose(p, data.p_knn_run, rtol=1e-5, atol=1e-9)


def test_rescore_matches_loop_reference(tiny):
    data, _ = tiny
    for k, tau, source in [(data.n_stored, 10.0, "pq"), (4, 2.5, "exact"), (1, 10.0, "pq")]:
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
