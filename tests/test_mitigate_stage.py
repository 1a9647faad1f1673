"""Tests of precompute/stages/mitigate.py (SPEC §9): every variant against an independent reference.

A Flat (exact) index makes the whitened variant checkable by a numpy brute force; the
whitening, τ choice, IDF weights and adaptive λ are recomputed here from the run's keys and
validation files with plain numpy. The validation split alone decides τ and λ: a run over
other evaluation tokens fits the very same rules.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import MITIGATIONS, build_tiny_run

from knnlm_core.config import ConfigError, RunConfig, load_config
from knnlm_core.keystore import open_keys
from precompute.pipeline import build_run
from precompute.stages.mitigate import tau_grid
from precompute.verify import verify_run

GRID = np.arange(101) / 100.0


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory, tiny_model) -> Path:
    """Exact (Flat) plain and Zipfian-whitened indexes: every p_kNN has a brute-force reference."""
    root = tmp_path_factory.mktemp("flat")
    return build_tiny_run(root / "flat", tiny_model, index_factory="Flat", exact_search="off",
                          **{**MITIGATIONS, "whiten": "zipfian", "valid_limit_tokens": 300})


def load(run: Path) -> dict:
    values = np.load(run / "values.npy")
    ev, va = np.load(run / "eval_ids.npy"), np.load(run / "valid_ids.npy")
    return {
        "values": values, "keys": np.asarray(open_keys(run, n=len(values))[:], np.float64),
        "q": np.load(run / "queries.npy").astype(np.float64), "y": ev[1:],
        "vq": np.load(run / "valid_queries.npy").astype(np.float64), "vy": va[1:],
        "p_lm": np.load(run / "eval_lm.npz")["p_lm"], "vp_lm": np.load(run / "valid_lm.npz")["p_lm"],
        "mit": np.load(run / "mitigations.npz"), "meta": json.loads((run / "mitigations.json").read_text()),
        "cfg": json.loads((run / "run_config.json").read_text()),
    }


def brute_top(q, keys, values, k) -> tuple[np.ndarray, np.ndarray]:
    """(distances (Q, k), neighbour values (Q, k)) of the k nearest keys by a float64 brute force over every key.

    Searched once per query set: the τ grids below re-weight the same neighbours (p_from_top)."""
    d = ((q * q).sum(1)[:, None] - 2 * q @ keys.T + (keys * keys).sum(1)[None, :])  # (Q, N)
    top = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, top, 1), values[top]


def p_from_top(near, y, tau, weight=None) -> tuple[np.ndarray, np.ndarray]:
    """(p_kNN (Q,), nearest distance (Q,)) from brute_top's neighbours at temperature tau (optional type weights)."""
    dk, vals = near
    w = np.exp(-(dk - dk[:, :1]) / tau)
    if weight is not None:
        w = w * weight[vals]
    return (w * (vals == y[:, None])).sum(1) / w.sum(1), dk[:, 0]


def brute_p_knn(q, keys, values, y, k, tau, weight=None) -> tuple[np.ndarray, np.ndarray]:
    """(p_kNN (Q,), nearest distance (Q,)) by a float64 brute force over every key."""
    return p_from_top(brute_top(q, keys, values, k), y, tau, weight)


def ppl(p) -> float:
    return float(np.exp(np.mean(-np.log(p))))


def variant(meta: dict, name: str) -> dict:
    return next(v for v in meta["variants"] if v["variant"] == name)


def test_config_names_the_fix():
    with pytest.raises(ConfigError, match="valid_corpus"):
        RunConfig(whiten="zipfian").validate()
    with pytest.raises(ConfigError, match="whiten must be"):
        RunConfig(whiten="pca", valid_corpus="x").validate()
    assert RunConfig(whiten="entries, zipfian", valid_corpus="x").validate().whiten_kinds == ("entries", "zipfian")
    assert RunConfig().whiten_kinds == ()


def test_lm_entropy_equals_a_plain_hf_forward(flat_run, tiny_model):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = np.load(flat_run / "eval_ids.npy")
    with torch.no_grad():
        logits = model(torch.from_numpy(ids[None, :128].astype(np.int64))).logits[0].double()  # (128, V)
    p = torch.softmax(logits, -1)
    want = -(p * torch.log(p)).sum(-1).numpy()[:127]  # position t predicts token t + 1
    got = np.load(flat_run / "eval_entropy.npy")[:127]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_zipfian_transform_equals_numpy_reference(flat_run):
    r = load(flat_run)
    keys, values = r["keys"], r["values"]
    saved = np.load(flat_run / "whiten_zipfian.npz")
    counts = np.bincount(values)
    seen = np.flatnonzero(counts)
    mu = np.zeros((len(counts), keys.shape[1]))
    np.add.at(mu, values, keys)
    mu = mu[seen] / counts[seen, None]
    p = counts[seen] / counts.sum()
    mu_z = p @ mu
    c_z = (mu - mu_z).T @ ((mu - mu_z) * p[:, None])
    np.testing.assert_allclose(saved["mean"], mu_z, rtol=1e-9, atol=1e-9)
    m = saved["matrix"]
    # M Mᵀ = (C_Z + εI)⁻¹ whatever basis the eigendecomposition picked
    np.testing.assert_allclose(m @ m.T, np.linalg.inv(c_z + float(saved["eps"]) * np.eye(len(c_z))), rtol=1e-6,
                               atol=1e-6 * np.abs(m @ m.T).max())


def test_whitened_variant_and_its_tau_equal_a_brute_force(flat_run):
    r = load(flat_run)
    w = np.load(flat_run / "whiten_zipfian.npz")
    white = lambda x: (x - w["mean"]) @ w["matrix"]  # noqa: E731
    keys_w, k = white(r["keys"]), r["cfg"]["k"]
    # τ: the grid value with the lowest validation kNN-LM PPL at the run's λ
    grid = tau_grid(r["cfg"]["temperature"])
    near = brute_top(white(r["vq"]), keys_w, r["values"], k)
    vppl = [ppl(r["cfg"]["lambda"] * p_from_top(near, r["vy"], t)[0] + (1 - r["cfg"]["lambda"]) * r["vp_lm"])
            for t in grid]
    tau = variant(r["meta"], "zipfian")["tau"]
    assert tau == grid[int(np.argmin(vppl))]
    p, _ = brute_p_knn(white(r["q"]), keys_w, r["values"], r["y"], k, tau)
    np.testing.assert_allclose(r["mit"]["p_knn_zipfian"], p, rtol=1e-4, atol=1e-7)
    bad = p.copy()
    bad[np.flatnonzero(p > 0.01)[0]] *= 1.01
    assert not np.allclose(r["mit"]["p_knn_zipfian"], bad, rtol=1e-4, atol=1e-7)  # the comparison can fail


def test_idf_tau_and_adaptive_lambda_equal_numpy(flat_run):
    r = load(flat_run)
    k, tau_run, lam_run = r["cfg"]["k"], r["cfg"]["temperature"], r["cfg"]["lambda"]
    freq = np.bincount(r["values"], minlength=int(max(r["values"].max(), r["y"].max(), r["vy"].max())) + 1)
    idf = np.log1p(len(r["values"]) / np.maximum(freq, 1))
    near, v_near = brute_top(r["q"], r["keys"], r["values"], k), brute_top(r["vq"], r["keys"], r["values"], k)
    p_idf, _ = p_from_top(near, r["y"], tau_run, idf)
    np.testing.assert_allclose(r["mit"]["p_knn_idf"], p_idf, rtol=1e-4, atol=1e-7)
    tau = variant(r["meta"], "tau")["tau"]
    vppl = [ppl(lam_run * p_from_top(v_near, r["vy"], t)[0] + (1 - lam_run) * r["vp_lm"]) for t in tau_grid(tau_run)]
    assert tau == tau_grid(tau_run)[int(np.argmin(vppl))]
    assert variant(r["meta"], "tau")["valid_ppl"] <= variant(r["meta"], "plain")["valid_ppl"]  # the run's τ is a candidate
    np.testing.assert_allclose(r["mit"]["p_knn_tau"], p_from_top(near, r["y"], tau)[0], rtol=1e-4, atol=1e-7)
    # adaptive λ by LM entropy: equal-population validation bins, grid minimiser per bin, applied to eval entropy
    vp_knn, _ = p_from_top(v_near, r["vy"], tau_run)
    h_valid, h_eval = np.load(flat_run / "valid_entropy.npy").astype(np.float64), r["mit"]["lm_entropy"]
    n_bins = r["cfg"]["adaptive_bins"]
    edges = np.quantile(h_valid, np.arange(1, n_bins) / n_bins)
    rule = r["meta"]["rules"]["adaptive-entropy"]
    np.testing.assert_allclose(rule["edges"], edges, rtol=1e-12)
    b_valid = np.searchsorted(edges, h_valid, side="right")
    for b in range(n_bins):
        sel = b_valid == b
        with np.errstate(divide="ignore"):
            nll = [-np.log(g * vp_knn[sel] + (1 - g) * r["vp_lm"][sel]).sum() for g in GRID]
        assert rule["lam"][b] == pytest.approx(GRID[int(np.argmin(nll))]), b
    np.testing.assert_array_equal(r["mit"]["lam_entropy"],
                                  np.asarray(rule["lam"])[np.searchsorted(edges, h_eval, side="right")])


def test_evaluation_tokens_never_enter_a_fit(mitigated_run, tmp_path, tiny_model):
    """Another evaluation slice, same validation split: identical τ choices and λ rules."""
    other = tmp_path / "tiny-mitigated"
    shutil.copytree(mitigated_run, other)
    cfg = replace(load_config(mitigated_run.parent / "tiny-mitigated.toml", MITIGATIONS), eval_limit_tokens=300)
    built = {f: (other / f).stat().st_mtime_ns for f in ("index_zipfian.faiss", "index_entries.faiss")}
    build_run(cfg, other, overwrite=True)  # the datastore, index and validation stages are reused
    # ... and so are the whitened indexes: they depend on the keys, not on the evaluation tokens
    assert built == {f: (other / f).stat().st_mtime_ns for f in built}
    a = json.loads((mitigated_run / "mitigations.json").read_text())
    b = json.loads((other / "mitigations.json").read_text())
    assert a["rules"] == b["rules"]
    assert [v["tau"] for v in a["variants"]] == [v["tau"] for v in b["variants"]]
    assert [v["valid_ppl"] for v in a["variants"]] == pytest.approx([v["valid_ppl"] for v in b["variants"]],
                                                                   rel=1e-12)
    assert np.load(other / "eval_ids.npy").shape != np.load(mitigated_run / "eval_ids.npy").shape


def test_database_tables_and_plain_row(mitigated_run, tiny_run):
    con = duckdb.connect(str(mitigated_run / "metrics.duckdb"), read_only=True)
    variants = con.execute("SELECT * FROM mitigations ORDER BY ord").fetchdf().set_index("variant")
    ppl_knnlm = con.execute("SELECT ppl_knnlm FROM run").fetchone()[0]
    cols = {c for (c,) in con.execute("SELECT column_name FROM (DESCRIBE mitigation_tokens)").fetchall()}
    con.close()
    assert list(variants.index) == ["plain", "tau", "idf", "adaptive-nn", "adaptive-entropy", "zipfian", "entries",
                                    "infgram"]
    assert variants.loc["plain", "ppl"] == ppl_knnlm
    own_tau = variants.loc["tau", "tau"] == variants.loc["plain", "tau"]  # then the run's own p_kNN, not a copy
    assert isinstance(variants.loc["tau", "p_knn_column"], str) != own_tau
    assert cols == {"pos", "p_knn_idf", "p_knn_zipfian", "p_knn_entries", "lam_nn", "lam_entropy", "p_inf"} | (
        set() if own_tau else {"p_knn_tau"})
    con = duckdb.connect(str(tiny_run / "metrics.duckdb"), read_only=True)
    tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    con.close()
    assert not tables & {"mitigations", "mitigation_tokens", "adaptive_lambda"}


def failed(run: Path) -> set[str]:
    return {name for name, ok, _ in verify_run(run, sample=200, type_sample=20, exact_sample=20) if not ok}


@pytest.fixture(scope="module")
def intact_failed(mitigated_run, tmp_path_factory) -> set[str]:
    """The checks failing on an intact copy of the mitigated run, verified once for the module: every
    corruption test below starts from a byte-identical copy, so it used to repeat this same verification."""
    run = tmp_path_factory.mktemp("intact") / "run"
    shutil.copytree(mitigated_run, run)
    return failed(run)


@pytest.mark.parametrize("corruption, caught", [
    ("UPDATE mitigation_tokens_data SET p_knn_zipfian = p_knn_zipfian * 1.5 WHERE pos % 7 = 0",
     "mitigation_tokens.p_knn_zipfian = mitigations.npz"),
    ("UPDATE mitigation_tokens_data SET lam_nn_pct = 99 WHERE pos = 5", "lam_nn = adaptive_lambda rule of nn_dist"),
    ("CREATE TABLE c AS SELECT * FROM adaptive_lambda; "
     "UPDATE c SET lam = lam + 0.01 WHERE variant = 'adaptive-entropy' AND bin = 0; "
     "CREATE OR REPLACE VIEW adaptive_lambda AS SELECT * FROM c",
     "lam_entropy = adaptive_lambda rule of lm_entropy"),
    ("CREATE TABLE c AS SELECT * FROM mitigations; UPDATE c SET ppl = ppl * 0.99 WHERE variant = 'idf'; "
     "CREATE OR REPLACE VIEW mitigations AS SELECT * FROM c", "mitigations.ppl of idf (from its columns)"),
    ("whiten matrix", "entries whitening: Mᵀ(C + εI)M = I"),
    ("npz zipfian", "p_knn_zipfian (re-searched over index_zipfian.faiss)"),
    ("npz idf", "p_knn_idf (re-searched, numpy IDF)"),
])
def test_verify_catches_each_corruption(mitigated_run, intact_failed, tmp_path, corruption, caught):
    assert caught not in intact_failed  # the check passes on the intact run ...
    run = tmp_path / "run"
    shutil.copytree(mitigated_run, run)
    if corruption == "whiten matrix":
        w = dict(np.load(run / "whiten_entries.npz"))
        w["matrix"] = w["matrix"] * 1.01
        np.savez(run / "whiten_entries.npz", **w)
    elif corruption == "npz zipfian":  # file and table corrupted alike: only the re-search can tell
        m = dict(np.load(run / "mitigations.npz"))
        m["p_knn_zipfian"] = m["p_knn_zipfian"] * 0.5 + 0.25
        np.savez(run / "mitigations.npz", **m)
        con = duckdb.connect(str(run / "metrics.duckdb"))
        con.execute("UPDATE mitigation_tokens_data SET p_knn_zipfian = p_knn_zipfian * 0.5 + 0.25")
        con.close()
    elif corruption == "npz idf":  # a 1% error, consistent in file and table: above the 0.1% tolerance
        m = dict(np.load(run / "mitigations.npz"))
        m["p_knn_idf"] = (m["p_knn_idf"] * 1.01).astype(m["p_knn_idf"].dtype)
        np.savez(run / "mitigations.npz", **m)
        con = duckdb.connect(str(run / "metrics.duckdb"))
        con.execute("UPDATE mitigation_tokens_data SET p_knn_idf = (p_knn_idf::DOUBLE * 1.01)::FLOAT")
        con.close()
    else:
        con = duckdb.connect(str(run / "metrics.duckdb"))
        con.execute(corruption)
        con.close()
    assert caught in failed(run)  # ... and fails on the corrupted copy




def test_infgram_lambda_is_the_validation_grid_minimiser(mitigated_run):
    """SPEC §12: λ_∞ minimises the validation PPL of λ p_∞ + (1 − λ) p_LM over 0…1 step 0.01 (numpy here)."""
    inf, lm = np.load(mitigated_run / "infgram.npz"), np.load(mitigated_run / "valid_lm.npz")
    grid = np.arange(101) / 100
    ppl = [np.exp(np.mean(-np.log(g * inf["valid_p_inf"] + (1 - g) * lm["p_lm"]))) for g in grid]
    con = duckdb.connect(str(mitigated_run / "metrics.duckdb"), read_only=True)
    lam, valid_ppl = con.execute("SELECT lam, valid_ppl FROM mitigations WHERE variant = 'infgram'").fetchone()
    con.close()
    assert lam == pytest.approx(grid[int(np.argmin(ppl))]) and valid_ppl == pytest.approx(min(ppl), rel=1e-12)
