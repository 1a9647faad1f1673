"""The exact-search stage (SPEC §8) against independent references on the tiny runs:
exact neighbours vs a float64 numpy brute force, recall@k vs sets built from a direct faiss
search, p_knn_exact recomputed from scratch, and the IVFPQ setting equal to the run's own p_kNN."""

from __future__ import annotations

import duckdb
import faiss
import numpy as np
import pytest
from conftest import build_tiny_run

from knnlm_core.config import load_config
from knnlm_core.keystore import open_keys
from knnlm_core.knn import recall_at
from precompute.exact import exact_knn_torch, exact_knn_with_dists

TAU = 10.0


def _brute_force(run_dir):
    """(float64 squared distances (T, N), values (N,), targets (T,)) from the run's files alone."""
    keys = np.asarray(open_keys(run_dir), dtype=np.float64)
    q = np.load(run_dir / "queries.npy").astype(np.float64)
    d2 = ((q[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    values = np.load(run_dir / "values.npy")
    targets = np.load(run_dir / "eval_ids.npy")[1:]
    return d2, values, targets


def _eval(run_dir, cols: str) -> dict:
    con = duckdb.connect(str(run_dir / "metrics.duckdb"), read_only=True)
    try:
        return con.execute(f"SELECT {cols} FROM eval_tokens ORDER BY pos").fetchnumpy()
    finally:
        con.close()


def test_recall_at_hand_case():
    approx = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [0, 1, 2, 3]])
    exact = np.array([[4, 3, 9, 8], [6, 5, 7, -1], [3, 2, 1, 0]])
    np.testing.assert_array_equal(recall_at(approx, exact, 4), [0.5, 0.5, 1.0])
    np.testing.assert_array_equal(recall_at(approx, exact, 2), [0.0, 1.0, 0.0])  # only the first k of each count
    np.testing.assert_array_equal(recall_at(np.full((1, 2), -1), np.full((1, 2), -1), 2), [0.0])  # padding never hits


def test_exact_neighbours_equal_brute_force(tiny_run):
    d2, _, _ = _brute_force(tiny_run)
    con = duckdb.connect(str(tiny_run / "metrics.duckdb"), read_only=True)
    nb = con.execute("SELECT pos, rank, entry, distance FROM exact_neighbors ORDER BY pos, rank").fetchnumpy()
    con.close()
    t, s = d2.shape[0], 16
    entries = nb["entry"].reshape(t, s)
    want = np.sort(d2, axis=1)[:, :s]
    got = np.take_along_axis(d2, entries, axis=1)  # true distance of each stored exact neighbour
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # the s nearest (ties may swap entries)
    np.testing.assert_allclose(nb["distance"].reshape(t, s), want, rtol=1e-4, atol=1e-4)
    assert (np.diff(nb["distance"].reshape(t, s), axis=1) >= 0).all()  # ranked by distance


def test_p_knn_exact_recomputed_independently(tiny_run):
    d2, values, targets = _brute_force(tiny_run)
    k = 64
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    dk = np.take_along_axis(d2, order, axis=1)
    w = np.exp(-(dk - dk[:, :1]) / TAU)
    w /= w.sum(axis=1, keepdims=True)
    want = (w * (values[order] == targets[:, None])).sum(axis=1)
    got = _eval(tiny_run, "p_knn_exact, exact_target_rank")
    np.testing.assert_allclose(got["p_knn_exact"], want, rtol=1e-3, atol=1e-7)
    rank = np.where((values[order] == targets[:, None]).any(1), (values[order] == targets[:, None]).argmax(1) + 1, 0)
    stored = np.nan_to_num(got["exact_target_rank"].astype(float), nan=0).astype(int)
    assert (stored == rank).mean() > 0.99  # equal up to near-ties between fp32 and fp64 distances


def test_recall_equals_sets_of_a_direct_search(tiny_run):
    d2, _, _ = _brute_force(tiny_run)
    index = faiss.read_index(str(tiny_run / "index.faiss"))
    faiss.extract_index_ivf(index).nprobe = 4
    q = np.load(tiny_run / "queries.npy").astype(np.float32)
    _, ivf = index.search(q, 64)
    exact = np.argsort(d2, axis=1, kind="stable")
    got = _eval(tiny_run, "recall_16, recall_64, recall_1024")
    for k in (16, 64):
        want = np.array([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(ivf, exact, strict=True)])
        assert np.abs(got[f"recall_{k}"] - want).max() <= 1 / k + 1e-12  # at most one swap at a tie
        assert abs(got[f"recall_{k}"].mean() - want.mean()) < 0.01
    assert np.ma.getmaskarray(got["recall_1024"]).all()  # k = 64 < 1024: NULL (not defined)


def test_ivf_settings_reproduce_the_runs_own_p_knn(runs_root):
    pq = _eval(runs_root / "tiny", "p_knn, p_knn_ivf_pq, p_knn_ivf_exact")
    np.testing.assert_array_equal(pq["p_knn"], pq["p_knn_ivf_pq"])  # bit-identical: same search, same math
    ex = _eval(runs_root / "tiny-exact", "p_knn, p_knn_ivf_exact")
    np.testing.assert_array_equal(ex["p_knn"], ex["p_knn_ivf_exact"])
    assert not np.array_equal(pq["p_knn_ivf_pq"], pq["p_knn_ivf_exact"])  # the settings do differ


@pytest.mark.parametrize("impl", ["faiss", "torch"])
def test_exact_knn_with_dists(impl):
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(3000, 24)).astype(np.float16)
    q = rng.normal(size=(40, 24)).astype(np.float32)
    if impl == "faiss":
        d, ids = exact_knn_with_dists(q, keys, 50)
    else:
        d, ids = exact_knn_torch(q, keys, 50, "cpu", block=700, with_dists=True)
    ref = ((q[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(d, np.sort(ref, axis=1)[:, :50], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.take_along_axis(ref, ids, axis=1), np.sort(ref, axis=1)[:, :50], rtol=1e-4, atol=1e-3)


def test_exact_search_off_and_auto(tmp_path, tiny_model):
    run = build_tiny_run(tmp_path / "off", tiny_model, exact_search="off")
    con = duckdb.connect(str(run / "metrics.duckdb"), read_only=True)
    assert con.execute("SELECT count(p_knn_exact), count(recall_16) FROM eval_tokens").fetchone() == (0, 0)
    assert con.execute("SELECT count(*) FROM exact_neighbors").fetchone()[0] == 0
    assert con.execute("SELECT exact_search FROM run").fetchone()[0] is False
    con.close()
    assert not (run / "exact.npz").exists()
    from precompute.plan import Machine, decide_exact, plan_facts  # auto: the plan decides (tests/test_plan.py)

    cfg = load_config(None, {"exact_search": "auto"})
    on, why = decide_exact(cfg, plan_facts(cfg, 6000, 500), Machine(0, 2, 1, "local"))
    assert on and why.startswith("auto: on")


def test_exact_map_runs_on_the_gpu_pool_on_cuda():
    """Issue 23: the exact stage's map carries the GPU kind on a cuda run, so the Ray executor's pool choice
    (ray_executor.RayExecutor.pool: num_gpus=1 only for kind "gpu") puts exact search on GPU actors."""
    from types import SimpleNamespace

    from precompute.stages.exact import exact_job

    assert exact_job(SimpleNamespace(info={"device": "cuda"}), "k").kind == "gpu"
    assert exact_job(SimpleNamespace(info={"device": "cpu"}), "k").kind == "cpu"
