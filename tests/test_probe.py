"""The Probe library (SPEC §13, issue 24): text scored with a run's own model, index and settings.

- A passage of the run's own evaluation text that starts at its beginning gives the run's `eval_tokens`
  values (read from metrics.duckdb with plain SQL) and the run's neighbour block rows.
- A passage from the middle scored alone differs where it should: its first positions' p_LM (less context),
  and L_t = min(the run's L_t, positions since the text began), an identity of the definition.
- The What-if re-scoring equals a probe run at that τ / k and a plain-numpy softmax over the neighbours.
- Hostile text: empty, too long, control characters, markup, right-to-left, lone surrogates.
- A probe never writes to the run (a read-only copy is probed); a run without its files says what is missing.

Tolerance: the probe runs the run's own extraction code on the same windows and batch grid, so it is
bit-identical here; float columns are compared at rtol 1e-6 because a batch holding fewer windows (the
text's last one) may sum in another order in BLAS on other CPUs (docs/PROBE.md). Integer columns
(token ids, ranks, counts, L_t) and the ∞-gram counts are compared exactly.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from knnlm_core import neighbours, store
from knnlm_core.corpus import read_text, tokenize_text
from precompute import probe as lib

FLOAT_COLUMNS = ["p_lm", "p_knn", "p_knnlm", "nll_lm", "nll_knnlm", "gain", "query_pq_error", "knn_log_z", "p_inf",
                 "copy_share", "p_knn_ivf_pq", "p_knn_ivf_exact"]
EXACT_COLUMNS = ["token_id", "token", "freq", "freq_bin", "context_freq", "context_token_id", "target_rank", "n_target",
                 "hit_1", "hit_8", "hit_16", "hit_64", "hit_256", "hit_1024", "ctx_match_len", "inf_suffix_len",
                 "inf_count"]


@pytest.fixture(scope="module")
def loaded(tiny_run) -> lib.Probe:
    return lib.cached(tiny_run)


def _eval_table(run_dir: Path) -> pd.DataFrame:
    con = store.open_readonly(run_dir / store.DB_NAME)
    try:
        return con.execute("SELECT * FROM eval_tokens ORDER BY pos").df()
    finally:
        con.close()


def _lines(run_dir: Path, tokenizer, first: int, max_tokens: int) -> tuple[str, int]:
    """(whole lines of the evaluation corpus from line `first`, up to max_tokens tokens; the stream offset of
    their first token). The corpus is tokenized line by line, so these lines are a slice of the run's stream."""
    lines = read_text(Path(lib.read_manifest(run_dir)["config"]["eval_corpus"])).splitlines(keepends=True)
    offset = sum(len(tokenize_text(line, tokenizer)) for line in lines[:first])
    text, n = "", 0
    for line in lines[first:]:
        m = len(tokenize_text(line, tokenizer))
        if n + m > max_tokens:
            break
        text, n = text + line, n + m
    return text, offset


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """got equals want on every compared column: floats at rtol 1e-6 (NULL where NULL), the rest exactly."""
    assert len(got) == len(want) > 0
    for col in FLOAT_COLUMNS:
        a, b = got[col].astype(float).to_numpy(), want[col].astype(float).to_numpy()
        assert (np.isnan(a) == np.isnan(b)).all(), col
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-6, atol=0, err_msg=col)
    for col in EXACT_COLUMNS:
        a, b = got[col].reset_index(drop=True), want[col].reset_index(drop=True)
        assert (a.isna() == b.isna()).all() and (a[a.notna()] == b[b.notna()]).all(), col


def test_prefix_of_the_eval_text_gives_the_runs_numbers(loaded, tiny_run):
    text, offset = _lines(tiny_run, loaded.tokenizer, 0, 300)
    res = loaded.score(text)
    ev = np.load(tiny_run / "eval_ids.npy")
    t = len(res.tokens)
    assert offset == 0 and t > 150 and (res.ids == ev[: t + 1]).all()
    want = _eval_table(tiny_run).iloc[:t]
    assert_same(res.tokens, want)
    assert set(want.columns) - set(res.tokens.columns) == {"doc_id"}  # every other eval_tokens column is there
    block = neighbours.open_block(neighbours.block_dir(tiny_run, "eval", "plain"))
    assert (res.neighbours.ids == block.rows("ids", 0, t)).all()
    np.testing.assert_array_equal(res.neighbours.dist_exact, block.rows("dist_exact", 0, t))
    # the check is not blind: an edited value or a shifted position fails it
    with pytest.raises(AssertionError):
        assert_same(res.tokens, want.assign(p_lm=want["p_lm"] * (1 + 1e-5)))
    with pytest.raises(AssertionError):
        assert_same(res.tokens, _eval_table(tiny_run).iloc[1 : t + 1])


def test_a_passage_scored_alone_differs_where_it_should(loaded, tiny_run):
    text, offset = _lines(tiny_run, loaded.tokenizer, 4, 200)
    res = loaded.score(text)
    ev = np.load(tiny_run / "eval_ids.npy")
    t = len(res.tokens)
    assert offset > 64 and t > 100 and (res.ids == ev[offset : offset + t + 1]).all()
    run = _eval_table(tiny_run).iloc[offset : offset + t].reset_index(drop=True)
    got = res.tokens
    assert (got["token_id"].to_numpy() == run["token_id"].to_numpy()).all()
    # less context at the start: the first positions' p_LM are not the run's
    first = np.abs(np.log(got["p_lm"].to_numpy()[:3]) - np.log(run["p_lm"].to_numpy()[:3]))
    assert (first > 1e-3).all(), first
    # L_t counts only context inside the text: min(the run's L_t, j + 1) (occurrence is suffix-closed)
    since = np.arange(t) + 1
    assert (got["ctx_match_len"].to_numpy() == np.minimum(run["ctx_match_len"].to_numpy(), since)).all()
    # the ∞-gram suffix fits in the text; where the run's suffix did, the estimate is the run's
    assert (got["inf_suffix_len"].to_numpy() <= since).all()
    fits = run["inf_suffix_len"].to_numpy() <= since
    np.testing.assert_array_equal(got["p_inf"].to_numpy()[fits], run["p_inf"].to_numpy()[fits])


def _numpy_p_knn(res: lib.ProbeResult, k: int, tau: float, source: str) -> np.ndarray:
    """p_kNN recomputed from the searched neighbours with plain numpy (float64 softmax of -d / τ)."""
    d = (res.neighbours.dist_exact if source == "exact" else res.neighbours.dist_pq)[:, :k].astype(np.float64)
    v = res.neighbours.values[:, :k]
    logits = np.where(v >= 0, -d / tau, -np.inf)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    hit = v == res.ids[1:, None]
    return (w * hit).sum(axis=1) / w.sum(axis=1)


def test_rescore_equals_a_probe_at_those_settings(loaded, tiny_run):
    text, _ = _lines(tiny_run, loaded.tokenizer, 0, 120)
    res = loaded.score(text)
    again = lib.rescore(loaded, res, tau=3.0)
    direct = loaded.score(text, tau=3.0)
    pd.testing.assert_frame_equal(again.tokens, direct.tokens)
    np.testing.assert_allclose(again.tokens["p_knn"], _numpy_p_knn(res, loaded.k, 3.0, "pq"), rtol=1e-9, atol=1e-15)
    assert not np.allclose(again.tokens["p_knn"], res.tokens["p_knn"])
    small = lib.rescore(loaded, res, k=8, lam=0.5, source="exact")
    p = _numpy_p_knn(res, 8, float(loaded.cfg.temperature), "exact")
    np.testing.assert_allclose(small.tokens["p_knn"], p, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(small.tokens["p_knnlm"], 0.5 * p + 0.5 * res.tokens["p_lm"], rtol=1e-12)
    assert small.tokens["hit_16"].isna().all() and small.tokens["hit_8"].notna().all()
    rank = small.tokens["target_rank"]
    assert (rank.dropna() <= 8).all()
    pd.testing.assert_frame_equal(small.tokens, loaded.score(text, k=8, lam=0.5, source="exact").tokens)
    with pytest.raises(lib.ProbeError, match="k must be"):
        lib.rescore(loaded, res, k=loaded.k + 1)
    nb = lib.neighbour_table(loaded, res, 5)
    assert list(nb["entry"]) == list(res.neighbours.ids[5, : len(nb)])
    assert nb["weight_in_p_knn"][nb["hit"]].sum() <= res.tokens["p_knn"].iloc[5] + 1e-12
    assert (nb["context"] == ["".join(loaded.decode(loaded.ids_d[max(0, e - 11) : e + 1])) for e in nb["entry"]]).all()


@pytest.mark.parametrize("text", [
    "<script>alert(1)</script> **bold** [x](http://evil.example) $x$ :red[y]",
    "null \x00 bell \x07 escape \x1b[31m tab\tCR\r end",
    "שלום עולם \u202eabc\u202c مرحبا",
    "lone surrogate \ud800 and Ã©Ã¨ mojibake \ufffd",
])
def test_hostile_text_is_scored(loaded, text):
    res = loaded.score(text)
    assert len(res.tokens) == len(res.ids) - 1 > 0 and np.isfinite(res.tokens["nll_lm"]).all()


def test_text_that_cannot_be_probed(loaded):
    for text in ("", "   \n\t "):
        with pytest.raises(lib.ProbeError, match="empty"):
            loaded.score(text)
    with pytest.raises(lib.ProbeError, match="fewer than 2 tokens"):
        loaded.score("a")
    with pytest.raises(lib.ProbeError, match="too long: 2,001 tokens") as err:
        loaded.score("a" + " a" * lib.MAX_TOKENS)
    assert "\n" not in str(err.value)
    with pytest.raises(lib.ProbeError, match="too long"):
        loaded.score("x" * (40 * lib.MAX_TOKENS + 1))


def test_sessions_probing_at_once_get_their_own_results(loaded, tiny_run):
    """One loaded probe shared by 4 threads (the dashboard's sessions), each scoring another text at once."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [_lines(tiny_run, loaded.tokenizer, first, 200)[0] for first in (0, 3, 4, 9)]
    alone = [loaded.score(t).tokens for t in texts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda t: loaded.score(t).tokens, texts * 2))
    for i, got in enumerate(together):
        pd.testing.assert_frame_equal(got, alone[i % 4])


def test_a_probe_never_writes_to_the_run(tmp_path, tiny_run):
    run = tmp_path / "ro"
    shutil.copytree(tiny_run, run)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}
    for p in [run, *run.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        res = lib.load(run).score("The probe reads the run and writes nothing.")
        assert len(res.tokens) > 3
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")} == before


def test_a_run_without_its_files_says_what_is_missing(tmp_path, tiny_run):
    run = tmp_path / "partial"
    run.mkdir()
    for name in ("manifest.json", store.DB_NAME, "values.npy"):
        shutil.copy(tiny_run / name, run / name)
    missing = lib.missing_files(run)
    assert "index.faiss" in missing and "suffix_array.npy" in missing and any("keys/" in m for m in missing)
    assert "values.npy" not in missing and "manifest.json" not in missing
    with pytest.raises(lib.ProbeError, match="index.faiss"):
        lib.load(run)
    assert lib.missing_files(tiny_run) == []
    shipped = REPO / "data" / "runs" / "demo"
    if shipped.is_dir():
        assert "index.faiss" in lib.missing_files(shipped)


def test_the_app_side_imports_no_torch():
    """The page, its helpers and the cache import precompute.probe, which must not import torch / faiss."""
    code = ("import sys; import precompute.probe, ui.probe, ui.cache; "
            "bad = [m for m in ('torch', 'faiss', 'transformers') if m in sys.modules]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)
