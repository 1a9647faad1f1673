"""Tests of what ships in git: the demo LM, the demo run, the corpora and data/'s size."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "data" / "models" / "demo-gpt2"
DEMO = REPO / "data" / "runs" / "demo"
PAGES = ["overview", "bins", "tokens", "neighbors", "exact", "whatif", "mitigations", "compare", "novelty"]

needs_model = pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="demo model not built yet")
needs_demo = pytest.mark.skipif(not (DEMO / "metrics.duckdb").exists(), reason="demo run not built yet")


def test_corpora_match_their_published_hashes():
    import gzip

    expected = {  # sha256 of the uncompressed files (data/SOURCES.md)
        "wikitext2-train.tokens.gz": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "wikitext2-valid.raw.gz": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
        "wikitext2-test.raw.gz": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
        "tinyshakespeare.txt.gz": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    }
    for name, digest in expected.items():
        data = gzip.decompress((REPO / "data" / "corpora" / name).read_bytes())
        assert hashlib.sha256(data).hexdigest() == digest, name


def test_data_tracked_in_git_is_at_most_64_mb():
    files = subprocess.run(["git", "ls-files", "-z", "data"], cwd=REPO, capture_output=True, check=True).stdout
    paths = [REPO / p for p in files.decode().split("\0") if p]
    total = sum(p.stat().st_size for p in paths if p.exists())
    assert total <= 64_000_000, f"data/ in git is {total / 1e6:.2f} MB (the limit is 64 MB)"


@needs_model
def test_demo_model_loads_offline_and_is_small_fp16():
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = MODEL / "model.safetensors"
    assert weights.stat().st_size <= 25 * 1024 * 1024
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    assert len(tok) == 50257 and tok("Hello world")["input_ids"] == [15496, 995]
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), local_files_only=True)
    assert model.config.model_type == "gpt2" and model.config.n_embd % 64 == 0
    assert (MODEL / "README.md").read_text().count("valid PPL") >= 1


@needs_model
def test_demo_model_perplexity_on_valid_slice():
    """A trained model: sliding-window PPL on 4k tokens of WikiText-2 valid is far below uniform (50,257)."""
    import torch
    from transformers import AutoModelForCausalLM

    from knnlm_core.corpus import load_tokenizer, tokenize_file
    from knnlm_core.windows import plan_windows

    model = AutoModelForCausalLM.from_pretrained(str(MODEL), local_files_only=True, dtype=torch.float32).eval()
    ids = tokenize_file(REPO / "data/corpora/wikitext2-valid.raw.gz", load_tokenizer(str(MODEL)), 4096)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in plan_windows(len(ids), 512, 256):
            x = torch.from_numpy(ids[w.begin : w.end].astype(np.int64))[None]
            logp = torch.log_softmax(model(x).logits[0].float(), -1)
            lo = w.first_pos - w.begin
            tgt = x[0, lo + 1 :]
            nll -= logp[lo : lo + len(tgt)].gather(1, tgt[:, None]).sum().item()
            n += len(tgt)
    assert math.exp(nll / n) < 1000


@needs_demo
def test_demo_run_opens_read_only_with_nothing_else_present(tmp_path):
    import shutil

    from knnlm_core import store

    only = tmp_path / "demo"
    only.mkdir()
    shutil.copy(DEMO / "metrics.duckdb", only)
    shutil.copy(DEMO / "manifest.json", only)
    con = store.open_readonly(only / "metrics.duckdb")
    run = con.execute("SELECT run_name, n_entries, n_eval, k, index_factory FROM run").fetchone()
    manifest = json.loads((DEMO / "manifest.json").read_text())
    assert run[0] == "demo" and run[1] > 2_000_000 and run[3] == 1024 and run[4] == "IVF4096,PQ64"
    assert manifest["config"]["eval_limit_tokens"] and manifest["store_neighbors"] == manifest["config"]["store_neighbors"]
    n_eval, = con.execute("SELECT count(*) FROM eval_tokens").fetchone()
    assert n_eval == run[2]
    con.close()


INTERVAL_PAGES = ("overview", "bins", "exact", "mitigations", "compare", "whatif", "novelty")


@needs_demo
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_the_shipped_demo(page, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("KNNLM_RUNS_DIR", str(DEMO.parent))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.query_params["run"] = "demo"
    at.run()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception and not at.error
    text = " ".join(m.value for m in at.markdown) + " ".join(str(m.value) for m in at.metric)
    assert text.strip()
    if page in INTERVAL_PAGES:  # SPEC §11: every per-bin table carries intervals, explained on the page
        tables = [d.value for d in at.dataframe]
        with_ci = [t for t in tables if any("_ci_lo" in c for c in t.columns) and any("n_docs" in c for c in t.columns)]
        assert with_ci, [list(t.columns) for t in tables]
        assert any(t[[c for c in t.columns if "_ci_lo" in c]].notna().any().any() for t in with_ci)
        assert "95% intervals" in " ".join(c.value for c in at.caption)
    st.cache_data.clear()
    st.cache_resource.clear()


OOD = DEMO.parent / "demo-shakespeare"
needs_ood = pytest.mark.skipif(not (OOD / "metrics.duckdb").exists(), reason="out-of-domain run not built yet")


@needs_demo
@needs_ood
def test_out_of_domain_run_shares_the_demos_datastore(tmp_path):
    import shutil

    from knnlm_core import store

    for name in ("demo", "demo-shakespeare"):
        (tmp_path / name).mkdir()
        shutil.copy(DEMO.parent / name / "metrics.duckdb", tmp_path / name)
    con = store.open_readonly(tmp_path / "demo-shakespeare" / "metrics.duckdb")
    domain, shared, sha = con.execute("SELECT eval_domain, datastore_tokens_from, datastore_sha256 FROM run").fetchone()
    n_ds = con.execute("SELECT count(*) FROM datastore_tokens").fetchone()[0]  # through the view on demo's table
    con.close()
    demo = store.open_readonly(tmp_path / "demo" / "metrics.duckdb")
    demo_domain, demo_sha, demo_n = demo.execute(
        "SELECT eval_domain, datastore_sha256, n_entries + 1 FROM run").fetchone()
    demo.close()
    assert (domain, demo_domain) == ("out-of-domain", "in-domain") and shared == "../demo/metrics.duckdb"
    assert sha == demo_sha and n_ds == demo_n
    (tmp_path / "demo" / "metrics.duckdb").unlink()  # without the demo the run is refused with a clear message
    with pytest.raises(store.RunSchemaError, match="reads its datastore tokens from"):
        store.open_readonly(tmp_path / "demo-shakespeare" / "metrics.duckdb")


@needs_demo
def test_shipped_demo_carries_exact_search_and_words():
    from knnlm_core import store

    con = store.open_readonly(DEMO / "metrics.duckdb")
    n_exact, n_eval = con.execute("SELECT count(p_knn_exact), count(*) FROM eval_tokens").fetchone()
    n_words = con.execute("SELECT count(*) FROM eval_words").fetchone()[0]
    same = con.execute("SELECT bool_and(p_knn_ivf_pq = p_knn) FROM eval_tokens").fetchone()[0]
    con.close()
    assert n_exact == n_eval == 19_999 and n_words > 15_000 and same


@needs_demo
@pytest.mark.parametrize("name", ["demo", "demo-shakespeare"])
def test_shipped_runs_carry_the_mitigations(name):
    """SPEC §9 on a fresh install: every variant, numbers that reproduce the run's own at its settings."""
    import duckdb

    con = duckdb.connect(str(DEMO.parent / name / "metrics.duckdb"), read_only=True)
    variants = con.execute("SELECT * FROM mitigations ORDER BY ord").df().set_index("variant")
    ppl_knnlm, lam = con.execute('SELECT ppl_knnlm, "lambda" FROM run').fetchone()
    ev = con.execute("SELECT e.p_lm, e.p_knn, m.* FROM eval_tokens e JOIN mitigation_tokens m USING (pos) "
                     "ORDER BY pos").df()
    con.close()
    assert list(variants.index) == ["plain", "tau", "idf", "adaptive-nn", "adaptive-entropy", "zipfian", "entries",
                                    "infgram"]
    assert variants.loc["plain", "ppl"] == ppl_knnlm
    for name, v in variants.iterrows():
        p_knn = ev[v["p_knn_column"]].astype(np.float64) if isinstance(v["p_knn_column"], str) else ev["p_knn"]
        lam_v = ev[v["lam_column"]] if isinstance(v["lam_column"], str) else v["lam"]
        ppl = math.exp(float(np.mean(-np.log(lam_v * p_knn + (1 - lam_v) * ev["p_lm"]))))
        assert ppl == pytest.approx(v["ppl"], rel=1e-5), name
    assert variants.loc["zipfian", "eps"] > 0 and variants.loc["entries", "eps"] > 0
    assert "validation" in variants.loc["zipfian", "notes"]
