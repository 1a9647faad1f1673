"""End-to-end tests of precompute/pipeline.py on tiny real runs (real model, FAISS, DuckDB)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_RUN_CONFIG, build_tiny_run, make_tiny_model, write_toml

from knnlm_core.keystore import open_keys
from knnlm_core.model import forward_windows, load_model
from knnlm_core.windows import plan_windows
from precompute.__main__ import main as cli
from precompute.verify import verify_run


def tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    con = duckdb.connect(str(run_dir / "metrics.duckdb"), read_only=True)
    out = {}
    for (name,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall():
        frame = con.execute(f"SELECT * FROM {name}").fetchdf()
        out[name] = frame.drop(columns=["created_at"], errors="ignore")
    con.close()
    return out


def digests(run_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir()) if p.is_file()}


def test_independent_recomputation_passes(tiny_run):
    failed = [c for c in verify_run(tiny_run, sample=500) if not c[1]]
    assert not failed


def test_exact_distance_run_recomputes(runs_root):
    run = runs_root / "tiny-exact"
    assert json.loads((run / "manifest.json").read_text())["parameters"]["distance_source"] == "exact"
    assert not [c for c in verify_run(run, sample=300) if not c[1]]


def test_flat_index_neighbours_equal_brute_force(tmp_path, tiny_model):
    run = build_tiny_run(tmp_path / "flat", tiny_model, index_factory="Flat", k=32, store_neighbors=32,
                         datastore_limit_tokens=3000, eval_limit_tokens=200)
    keys = np.asarray(open_keys(run)).astype(np.float32)
    queries = np.load(run / "queries.npy").astype(np.float32)
    d2 = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)  # (T, N) brute force
    con = duckdb.connect(str(run / "metrics.duckdb"), read_only=True)
    nb = con.execute("SELECT pos, rank, entry, distance_pq, distance_exact FROM neighbors ORDER BY pos, rank").fetchdf()
    got_d = nb["distance_pq"].to_numpy().reshape(len(queries), 32)
    want_d = np.sort(d2, axis=1)[:, :32]
    np.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-3)
    entries = nb["entry"].to_numpy().reshape(len(queries), 32)
    # The stored entries are a brute-force top-32 (ties may be ordered differently).
    np.testing.assert_allclose(np.take_along_axis(d2, entries, axis=1), want_d, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(nb["distance_exact"], nb["distance_pq"], rtol=1e-4, atol=1e-3)


def test_every_eval_token_scored_once_with_its_window(tiny_run, tiny_model):
    ids = np.load(tiny_run / "eval_ids.npy")
    queries = np.load(tiny_run / "queries.npy")
    con = duckdb.connect(str(tiny_run / "metrics.duckdb"), read_only=True)
    ev = con.execute("SELECT pos, token_id, p_lm FROM eval_tokens ORDER BY pos").fetchdf()
    assert ev["pos"].tolist() == list(range(len(ids) - 1))
    assert (ev["token_id"].to_numpy() == ids[1:]).all()
    lm = load_model(str(tiny_model))
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    windows = plan_windows(len(ids), manifest["max_context"], manifest["stride"])
    owned = np.concatenate([np.arange(w.first_pos, w.end - 1) for w in windows])
    assert (owned == np.arange(len(ids) - 1)).all()
    for w in (windows[0], windows[len(windows) // 2], windows[-1]):
        keys, logits = forward_windows(lm, ids, [w], with_logits=True)
        np.testing.assert_allclose(queries[w.first_pos : w.end - 1].astype(np.float32), keys[0], atol=2e-2, rtol=1e-2)
        p = torch.softmax(logits[0], -1).gather(1, torch.from_numpy(ids[w.first_pos + 1 : w.end].astype(np.int64))[:, None])
        np.testing.assert_allclose(ev["p_lm"].to_numpy()[w.first_pos : w.end - 1], p[:, 0].numpy(), rtol=1e-4)


def test_rerun_after_deleting_stage_outputs_is_identical(fresh_run, tiny_model):
    before = tables(fresh_run)
    shutil.rmtree(fresh_run / "keys")
    for name in ("search.npz", "metrics.duckdb"):
        (fresh_run / name).unlink()
    cfg = write_toml(fresh_run.parent / "tiny.toml", {"model": str(tiny_model), **TINY_RUN_CONFIG})
    assert cli(["--config", str(cfg), "--run-dir", str(fresh_run), "--run-name", "tiny"]) == 0
    stages = json.loads((fresh_run / "stages.json").read_text())
    assert stages["datastore"]["seconds"] >= 0 and (fresh_run / "keys" / "shards.json").exists()
    after = tables(fresh_run)
    assert before.keys() == after.keys()
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name], check_exact=False, rtol=1e-6)


def test_lambda_change_with_overwrite_reuses_search(fresh_run, tiny_model):
    cfg = write_toml(fresh_run.parent / "tiny.toml", {"model": str(tiny_model), **TINY_RUN_CONFIG})
    mtime = (fresh_run / "search.npz").stat().st_mtime_ns
    assert cli(["--config", str(cfg), "--run-dir", str(fresh_run), "--lambda", "0.5", "--overwrite"]) == 0
    assert (fresh_run / "search.npz").stat().st_mtime_ns == mtime
    con = duckdb.connect(str(fresh_run / "metrics.duckdb"), read_only=True)
    lam, = con.execute('SELECT "lambda" FROM run').fetchone()
    p = con.execute("SELECT p_lm, p_knn, p_knnlm FROM eval_tokens").fetchdf()
    assert lam == 0.5
    np.testing.assert_allclose(p["p_knnlm"], 0.5 * p["p_knn"] + 0.5 * p["p_lm"])


# ---------------------------------------------------------------- bad input

def run_cli_expect_error(capsys, args: list[str], message: str) -> str:
    code = cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ") and message in err[-1], err
    return err[-1]


@pytest.fixture
def cfg_file(tmp_path, tiny_model):
    return lambda **kw: write_toml(tmp_path / "cfg.toml", {"model": str(tiny_model), **TINY_RUN_CONFIG, **kw})


def test_missing_corpus(capsys, tmp_path, cfg_file):
    cfg = cfg_file(eval_corpus=str(tmp_path / "nope.txt"))
    run_cli_expect_error(capsys, ["--config", str(cfg), "--run-dir", str(tmp_path / "r")], "corpus file not found")
    assert not (tmp_path / "r").exists()


def test_empty_corpus(capsys, tmp_path, cfg_file):
    (tmp_path / "empty.txt").write_text("  \n")
    cfg = cfg_file(datastore_corpus=str(tmp_path / "empty.txt"))
    run_cli_expect_error(capsys, ["--config", str(cfg), "--run-dir", str(tmp_path / "r")], "corpus file is empty")


def test_unknown_model_family(capsys, tmp_path, cfg_file):
    import transformers

    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(bert)
    cfg = cfg_file(model=str(bert))
    line = run_cli_expect_error(capsys, ["--config", str(cfg), "--run-dir", str(tmp_path / "r")],
                                "unsupported model family 'bert'")
    assert "gpt2" in line and "llama" in line


def test_pq_not_dividing_dimension(capsys, tmp_path, cfg_file):
    cfg = cfg_file(index_factory="IVF8,PQ7")
    line = run_cli_expect_error(capsys, ["--config", str(cfg), "--run-dir", str(tmp_path / "r")],
                                "not divisible by the PQ sub-quantizer count 7")
    assert "PQ64" in line or "PQ32" in line


def test_too_few_training_points(capsys, tmp_path, cfg_file):
    cfg = cfg_file(index_factory="IVF4096,PQ8")
    line = run_cli_expect_error(capsys, ["--config", str(cfg), "--run-dir", str(tmp_path / "r")],
                                "needs at least 159,744 training keys")
    assert "use IVF128" in line


def test_existing_run_with_other_config_is_refused(capsys, fresh_run, cfg_file):
    before = digests(fresh_run)
    run_cli_expect_error(capsys, ["--config", str(cfg_file(k=32)), "--run-dir", str(fresh_run)],
                         "holds a run with a different config (k: 64 -> 32)")
    assert digests(fresh_run) == before


def test_truncated_keys_file_is_rebuilt(capsys, fresh_run, cfg_file):
    """A truncated key shard is not trusted (issue 18): the datastore stage redoes that shard, the rest
    is reused, and the rebuilt run holds the same tables (no 'delete it and rerun' loop)."""
    keys = fresh_run / "keys" / "shard_00001.npy"
    whole = np.load(keys)
    keys.write_bytes(keys.read_bytes()[: keys.stat().st_size // 2])
    before = tables(fresh_run)
    assert cli(["--config", str(cfg_file()), "--run-dir", str(fresh_run), "--run-name", "tiny"]) == 0
    assert "rebuilding" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(keys).astype(np.float32), whole.astype(np.float32), rtol=1e-2, atol=1e-3)
    for name, frame in tables(fresh_run).items():
        pd.testing.assert_frame_equal(before[name], frame, check_exact=False, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("damage", ["garbage", "other dimension"])
def test_damaged_index_file_is_rebuilt(capsys, fresh_run, cfg_file, damage):
    """An index.faiss of another size than the one recorded when its stage finished is rebuilt, not read."""
    if damage == "garbage":
        (fresh_run / "index.faiss").write_bytes(b"not an index" * 10)
    else:
        faiss.write_index(faiss.IndexFlatL2(32), str(fresh_run / "index.faiss"))
    assert cli(["--config", str(cfg_file()), "--run-dir", str(fresh_run)]) == 0
    assert "[index] output index.faiss has" in capsys.readouterr().out
    assert faiss.read_index(str(fresh_run / "index.faiss")).d == 64


def test_truncated_database_is_rebuilt(capsys, fresh_run, cfg_file):
    """A half-truncated metrics.duckdb is never reported as a finished run (issue 18): refused untouched (exit 2),
    and with --overwrite set aside and rebuilt by the database stage, the other stages reused."""
    before = tables(fresh_run)
    db = fresh_run / "metrics.duckdb"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    garbled = db.read_bytes()
    args = ["--config", str(cfg_file()), "--run-dir", str(fresh_run), "--run-name", "tiny"]
    assert cli(args) == 2 and db.read_bytes() == garbled
    assert "is garbled" in capsys.readouterr().err
    assert cli([*args, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "[database] output metrics.duckdb" in out and "[search] up to date, skipped" in out
    for name, frame in tables(fresh_run).items():
        if name == "run":  # created_at is the rebuild's
            continue
        pd.testing.assert_frame_equal(before[name], frame, check_exact=False, rtol=1e-6)


def test_unknown_config_key(capsys, tmp_path, cfg_file):
    cfg = cfg_file(nprobes=3)
    run_cli_expect_error(capsys, ["--config", str(cfg), "--run-dir", str(tmp_path / "r")], "unknown config keys")


# ---------------------------------------------------------------- model families

@pytest.mark.parametrize("family,norm", [("gpt2", "transformer.h.1.ln_2"), ("gpt_neox", "gpt_neox.layers.1.post_attention_layernorm"),
                                         ("llama", "model.layers.1.post_attention_layernorm"),
                                         ("mistral", "model.layers.1.post_attention_layernorm")])
def test_hook_point_is_last_mlp_input(tmp_path, family, norm):
    path = make_tiny_model(tmp_path / family, family=family, hidden=64)
    lm = load_model(str(path))
    ids = np.arange(100, 140, dtype=np.int32)
    w = plan_windows(len(ids), 40, 20)
    seen = []
    handle = lm.model.get_submodule(norm).register_forward_hook(lambda m, a, out: seen.append(out))
    keys, _ = forward_windows(lm, ids, w, with_logits=True)
    handle.remove()
    assert lm.dim == 64 and keys[0].shape == (39, 64)
    np.testing.assert_allclose(keys[0], seen[-1][0, :39].float().numpy(), rtol=1e-5, atol=1e-6)


def test_neox_family_builds_a_full_run(tmp_path):
    model = make_tiny_model(tmp_path / "neox", family="gpt_neox")
    run = build_tiny_run(tmp_path / "neox-run", model, datastore_limit_tokens=2000, eval_limit_tokens=150,
                         index_factory="Flat", k=16, store_neighbors=8)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["hook_point"] == "gpt_neox.layers[-1].mlp (input)" and manifest["model_type"] == "gpt_neox"
    assert not [c for c in verify_run(run, sample=100) if not c[1]]


def test_app_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, knnlm_core.store, knnlm_core.bins, knnlm_core.knn, knnlm_core.config, "
            "knnlm_core.metrics, knnlm_core.index, knnlm_core.windows, knnlm_core.corpus, knnlm_core.keystore\n"
            "import importlib.util\n"
            "for m in ('knnlm_core.read', 'knnlm_core.whatif', 'ui'):\n"
            "    if importlib.util.find_spec(m): __import__(m)\n"
            "bad = [m for m in ('torch', 'transformers', 'streamlit') if m in sys.modules]\n"
            "assert not bad, bad")
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    core = "".join(p.read_text() for p in (repo / "knnlm_core").glob("*.py"))
    assert "import streamlit" not in core


def test_manifest_holds_the_whole_config(tiny_run):
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    from knnlm_core.config import RunConfig

    assert set(RunConfig().to_dict()) == set(manifest["config"])
    for field in ("model_fingerprint", "hook_point", "key_dim", "corpora", "software", "stage_seconds", "created_at"):
        assert manifest[field], field
    assert len(manifest["corpora"]["eval"]["sha256"]) == 64
    shutil.rmtree(tiny_run.parent / "__nothing__", ignore_errors=True)


# ---------------------------------------------------------------- engine: identity, defaults, more bad input

def test_model_retrained_in_place_invalidates_the_datastore(tmp_path):
    model = make_tiny_model(tmp_path / "model", seed=0)
    run = build_tiny_run(tmp_path / "run", model, datastore_limit_tokens=1500, eval_limit_tokens=150,
                         index_factory="Flat", k=16, store_neighbors=8)
    keys_before = np.asarray(open_keys(run)).copy()
    key_before = json.loads((run / "stages.json").read_text())["datastore"]["key"]
    make_tiny_model(tmp_path / "model", seed=1)  # "retrained": new weights, same path, same config
    build_tiny_run(tmp_path / "run", model, datastore_limit_tokens=1500, eval_limit_tokens=150,
                   index_factory="Flat", k=16, store_neighbors=8)
    stages = json.loads((run / "stages.json").read_text())
    assert stages["datastore"]["key"] != key_before
    assert not np.array_equal(np.asarray(open_keys(run)), keys_before)
    manifest = json.loads((run / "manifest.json").read_text())
    from knnlm_core.model import source_fingerprint

    assert manifest["model_fingerprint"] == source_fingerprint(str(model))


@pytest.mark.parametrize("n_positions,max_context,stride,want", [
    (2048, 0, 0, (1024, 512)), (128, 0, 0, (128, 64)), (1024, 256, 0, (256, 128)), (1024, 256, 100, (256, 100))])
def test_window_defaults(n_positions, max_context, stride, want):
    from knnlm_core.config import RunConfig
    from precompute.pipeline import resolve_windows

    assert resolve_windows(RunConfig(max_context=max_context, stride=stride), n_positions) == want


def test_max_context_above_n_positions_is_refused(capsys, tmp_path, cfg_file):
    run_cli_expect_error(capsys, ["--config", str(cfg_file(max_context=256)), "--run-dir", str(tmp_path / "r")],
                         "max_context 256 exceeds the model's 128 positions")
    assert not (tmp_path / "r").exists()


def test_index_mode_contamination_is_recorded(tmp_path, tiny_model):
    run = build_tiny_run(tmp_path / "ix", tiny_model, contamination_search="index", datastore_limit_tokens=3000,
                         eval_limit_tokens=150)
    con = duckdb.connect(str(run / "metrics.duckdb"), read_only=True)
    mode, = con.execute("SELECT contamination_mode FROM run").fetchone()
    n, = con.execute("SELECT count(*) FROM token_types WHERE freq > 0 AND contamination IS NOT NULL").fetchone()
    assert mode == "index" and n > 100
    assert json.loads((run / "manifest.json").read_text())["contamination_search"] == "index"


def test_corpus_not_utf8(capsys, tmp_path, cfg_file):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    run_cli_expect_error(capsys, ["--config", str(cfg_file(eval_corpus=str(bad))), "--run-dir",
                                  str(tmp_path / "r")], "is not UTF-8 text")
    assert not (tmp_path / "r").exists()


def test_run_dir_is_a_file(capsys, tmp_path, cfg_file):
    target = tmp_path / "afile"
    target.write_text("keep me")
    run_cli_expect_error(capsys, ["--config", str(cfg_file()), "--run-dir", str(target)],
                         "is an existing file, not a directory")
    assert target.read_text() == "keep me"


def test_factory_without_codec_is_refused(capsys, tmp_path, cfg_file):
    line = run_cli_expect_error(capsys, ["--config", str(cfg_file(index_factory="HNSW32")), "--run-dir",
                                         str(tmp_path / "r")], "has no standalone codec")
    assert "IVF<nlist>,PQ<m>" in line and not (tmp_path / "r").exists()


def test_missing_local_model_directory(capsys, tmp_path, cfg_file):
    run_cli_expect_error(capsys, ["--config", str(cfg_file(model=str(tmp_path / "no-such-model"))), "--run-dir",
                                  str(tmp_path / "r")], "no such model directory")


def test_cuda_requested_without_gpu(capsys, tmp_path, cfg_file):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run_cli_expect_error(capsys, ["--config", str(cfg_file(device="cuda")), "--run-dir", str(tmp_path / "r")],
                         "no CUDA GPU is visible")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_equals_cpu_run(tmp_path, tiny_model):
    runs = {dev: build_tiny_run(tmp_path / dev, tiny_model, device=dev, datastore_limit_tokens=3000,
                                eval_limit_tokens=300) for dev in ("cpu", "cuda")}
    keys = {dev: np.asarray(open_keys(r)).astype(np.float32) for dev, r in runs.items()}
    np.testing.assert_allclose(keys["cuda"], keys["cpu"], rtol=1e-2, atol=2e-3)
    q = {dev: np.load(r / "queries.npy").astype(np.float32) for dev, r in runs.items()}
    np.testing.assert_allclose(q["cuda"], q["cpu"], rtol=1e-2, atol=2e-3)
    t = {dev: tables(r) for dev, r in runs.items()}
    np.testing.assert_allclose(t["cuda"]["eval_tokens"]["p_lm"], t["cpu"]["eval_tokens"]["p_lm"], rtol=1e-3)
    np.testing.assert_allclose(t["cuda"]["run"]["ppl_lm"], t["cpu"]["run"]["ppl_lm"], rtol=1e-4)
