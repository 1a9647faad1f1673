"""`import_datastore = "knn-transformers:DIR"` in the pipeline (precompute/stages/imported.py, docs/IMPORT.md).

The session's tiny run is exported in knn-transformers' format (raw memmaps, its IVFPQ index copied),
then imported by a run of the same model and texts: its keys are read where they lie, its index is
used instead of trained, and every table of metrics.duckdb equals the native run's (compared with
pandas over both DuckDB files; floats to 1e-6 relative). A bad datastore is refused with one line
before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import build_tiny_run

from knnlm_core.keystore import open_keys
from precompute import knn_transformers as kt
from precompute.__main__ import main as precompute_main
from precompute.runner import RunError

RUN_ONLY = {"run"}  # tables that name the run and its config: compared column by column below


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peer") / "exported"
    kt.export_run(tiny_run, out)
    return out


@pytest.fixture(scope="module")
def imported_run(tiny_model, exported, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imported")
    return build_tiny_run(root / "imported", tiny_model, import_datastore=f"knn-transformers:{exported}")


def tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    con = duckdb.connect(str(run_dir / "metrics.duckdb"), read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        return {n: con.execute(f'SELECT * FROM "{n}"').df() for n in sorted(names)}
    finally:
        con.close()


def test_imported_run_has_the_native_tables(tiny_run, imported_run):
    native, imported = tables(tiny_run), tables(imported_run)
    assert sorted(native) == sorted(imported)
    for name in sorted(set(native) - RUN_ONLY):
        a, b = native[name], imported[name]
        assert list(a.columns) == list(b.columns), name
        assert len(a) == len(b), name
        for col in a.columns:
            x, y = a[col].to_numpy(), b[col].to_numpy()
            if np.issubdtype(x.dtype, np.floating):
                np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=f"{name}.{col}")
            else:
                pd.testing.assert_series_equal(b[col], a[col], obj=f"{name}.{col}")
    eval_tokens = imported["eval_tokens"]  # the kNN-LM columns are really there, not empty
    assert eval_tokens["p_knn"].notna().all() and (eval_tokens["p_knn"] > 0).any()


def test_keys_and_index_stay_where_they_lie(tiny_run, imported_run, exported):
    ds = kt.find_datastore(exported)
    listing = json.loads((imported_run / "keys/shards.json").read_text())
    assert listing["shards"] == [{"file": "imported_keys.raw", "rows": ds.size, "raw": True}]
    assert (imported_run / "keys/imported_keys.raw").resolve() == ds.keys_path.resolve()
    assert (imported_run / "index.faiss").resolve() == ds.index_paths[0].resolve()
    keys = open_keys(imported_run, ds.size, ds.dim)
    assert isinstance(keys.shards[0], np.memmap)
    np.testing.assert_array_equal(np.asarray(keys), np.asarray(open_keys(tiny_run)))
    manifest = json.loads((imported_run / "manifest.json").read_text())
    assert manifest["imported"]["rule"] == "contiguous: values[i] == stream[i + 1]"
    assert manifest["imported"]["keys"]["share_ok"] >= 0.95 and manifest["imported"]["index_used"]
    stages = json.loads((imported_run / "stages.json").read_text())
    assert stages["index"]["info"]["index_encoder"].startswith("imported")
    np.testing.assert_array_equal(np.load(imported_run / "values.npy"), np.load(tiny_run / "values.npy"))


def test_a_truncated_raw_key_file_is_named(imported_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(imported_run, run, symlinks=True, ignore=shutil.ignore_patterns("metrics.duckdb"))
    raw = tmp_path / "raw.keys"
    raw.write_bytes((run / "keys/imported_keys.raw").read_bytes()[:-2])
    (run / "keys/imported_keys.raw").unlink()
    (run / "keys/imported_keys.raw").symlink_to(raw)
    with pytest.raises(Exception, match="imported key file .* another size"):
        open_keys(run, 5999, 64)


def test_values_of_another_text_are_refused_before_anything_is_written(tiny_model, exported, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    vals = kt.open_values(kt.find_datastore(bad))
    mv = np.memmap(kt.find_datastore(bad).values_path, dtype=np.int32, mode="r+", shape=(len(vals), 1))
    mv[:, 0] = np.asarray(vals)[::-1]  # the same tokens, another text (the stream reversed)
    mv.flush()
    del mv
    (tmp_path / "runs").mkdir()
    with pytest.raises(RunError, match="^import_datastore: the first 32 values occur nowhere") as err:
        build_tiny_run(tmp_path / "runs" / "r", tiny_model, import_datastore=f"knn-transformers:{bad}")
    assert "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r.toml"]  # the test's config; no run directory


def test_cli_refuses_a_bad_import_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    for value, match in ((f"knn-transformers:{tmp_path / 'nope'}", "is no directory"),
                         (str(tmp_path), "names no known format")):
        code = precompute_main(["--config", str(cfg), "--run-dir", str(tmp_path / "r"), "--import-datastore", value])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "import_datastore" in err and match in err, err
        assert "point it at the knn-transformers dstore_dir" in err and not (tmp_path / "r").exists()


def test_a_rerun_reuses_every_stage(tiny_model, imported_run, exported, capsys):
    """The raw key entry and the linked index pass the runner's completeness checks: nothing is rebuilt."""
    before = json.loads((imported_run / "stages.json").read_text())
    build_tiny_run(imported_run, tiny_model, import_datastore=f"knn-transformers:{exported}")
    after = json.loads((imported_run / "stages.json").read_text())
    assert after == before  # same keys, same records (a rebuilt stage would record its new seconds and sizes)
    said = "".join(capsys.readouterr())
    assert said.count("up to date, skipped") == len(after) and "rebuilding" not in said


class Recorder:
    """Stands in for a Streamlit container: keeps what run_card writes."""

    def __init__(self):
        self.lines: list[str] = []

    def markdown(self, text: str) -> None:
        self.lines.append(text)


def test_run_card_says_the_datastore_is_imported(tiny_run, imported_run, exported):
    from ui.widgets import run_card

    cards = {}
    for run in (tiny_run, imported_run):
        con = duckdb.connect(str(run / "metrics.duckdb"), read_only=True)
        info = con.execute("SELECT * FROM run").df().iloc[0].to_dict()
        con.close()
        card = Recorder()
        run_card(info, card)
        cards[run.name] = "\n".join(card.lines)
    assert "imported" in cards["imported"] and str(exported) in cards["imported"]
    assert "imported" not in cards["tiny"]


def test_a_datastore_of_the_independent_writer_gives_the_native_tables(tiny_model, tmp_path):
    """Keys and values written by tests/test_knn_transformers.py's re-implementation of knn-transformers
    (HF forward, group_texts 128 / 64, raw memmaps), beside the native run's index: the imported run's
    tables equal the native run's of the same model and text (floats to 1e-5 relative, keys to fp16 rounding;
    measured here: the 1,663 keys and every float column bit-identical)."""
    from test_knn_transformers import BLOCK, SOURCE, STRIDE, corpus_lines, peer_rows, write_peer

    keys, values = peer_rows(tiny_model, corpus_lines(SOURCE), BLOCK, STRIDE, group_lines=1000)  # (N, d), (N,)
    (tmp_path / "runs").mkdir()
    native = build_tiny_run(tmp_path / "runs" / "native", tiny_model, datastore_limit_tokens=len(values) + 1)
    folder = write_peer(tmp_path / "peer", keys, values, index=False)
    shutil.copyfile(native / "index.faiss", folder / f"index_gpt2_{len(values)}_{keys.shape[1]}.indexed")
    imported = build_tiny_run(tmp_path / "runs" / "imported", tiny_model, datastore_limit_tokens=len(values) + 1,
                              import_datastore=f"knn-transformers:{folder}")
    native_keys = np.asarray(open_keys(native), dtype=np.float32)
    rel = np.linalg.norm(keys.astype(np.float32) - native_keys, axis=1) / np.linalg.norm(native_keys, axis=1)
    assert rel.max() < 2e-3  # fp16 rounding of the same key at most
    a, b = tables(native), tables(imported)
    for name in ("eval_tokens", "neighbors", "token_types"):
        for col in a[name].columns:
            x, y = a[name][col].to_numpy(), b[name][col].to_numpy()
            if np.issubdtype(x.dtype, np.floating):
                np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7, equal_nan=True, err_msg=f"{name}.{col}")
            else:
                pd.testing.assert_series_equal(b[name][col], a[name][col], obj=f"{name}.{col}")


@pytest.fixture(scope="module")
def sharded(exported, tmp_path_factory) -> Path:
    """The exported datastore with a fork's index: two files, ids 0..n_k-1 each (the independent writer)."""
    from test_knn_transformers import write_peer

    ds = kt.find_datastore(exported)
    keys, values = np.asarray(kt.open_keys(ds)), np.asarray(kt.open_values(ds))
    return write_peer(tmp_path_factory.mktemp("sharded") / "peer", keys, values, shards=2)


def test_a_sharded_index_with_shard_local_ids_is_merged(tiny_model, sharded, tmp_path):
    """A fork's index in two files with ids 0..n_k-1 each: merged into one index.faiss whose neighbours
    (ids and distances) equal faiss.IndexShards(successive_ids) over the shard files (kt.open_index)."""
    import faiss

    folder, ds = sharded, kt.find_datastore(sharded)
    keys = np.asarray(kt.open_keys(ds))
    (tmp_path / "runs").mkdir()
    run = build_tiny_run(tmp_path / "runs" / "r", tiny_model, import_datastore=f"knn-transformers:{folder}")
    merged = faiss.read_index(str(run / "index.faiss"))
    assert not (run / "index.faiss").is_symlink() and merged.ntotal == ds.size
    np.testing.assert_array_equal(np.sort(kt.index_ids(merged)), np.arange(ds.size))
    shards = kt.open_index(kt.find_datastore(folder), nprobe=8)
    faiss.extract_index_ivf(merged).nprobe = 8
    queries = keys[::97].astype(np.float32)  # (62, d)
    d_ref, i_ref = shards.search(queries, 10)
    d_got, i_got = merged.search(queries, 10)
    np.testing.assert_array_equal(i_got, i_ref)
    np.testing.assert_allclose(d_got, d_ref, rtol=1e-6)
    assert (i_got[:, 0] == np.arange(0, ds.size, 97)).mean() > 0.5  # global ids: a key finds its own row
    info = json.loads((run / "stages.json").read_text())["index"]["info"]
    assert info["index_encoder"] == "imported (2 shards merged)"


def test_shards_of_another_quantizer_are_refused(tiny_model, sharded, tmp_path):
    import faiss

    folder = tmp_path / "sharded"
    shutil.copytree(sharded, folder)
    ds = kt.find_datastore(folder)
    keys = np.asarray(kt.open_keys(ds))
    name = folder / f"index_gpt2_{ds.size}_{ds.dim}.indexed.1"
    part = faiss.read_index(str(name))
    other = faiss.IndexIVFPQ(faiss.IndexFlatL2(ds.dim), ds.dim, 8, 8, 4)  # another codec and other centroids
    other.train(keys[::3].astype(np.float32) + 1.0)
    other.add_with_ids(keys[ds.size - part.ntotal:].astype(np.float32), np.arange(part.ntotal))
    faiss.write_index(other, str(name))
    (tmp_path / "runs").mkdir()
    with pytest.raises(RunError, match="has another quantizer or codec") as err:
        build_tiny_run(tmp_path / "runs" / "r", tiny_model, import_datastore=f"knn-transformers:{folder}")
    assert "\n" not in str(err.value) and not (tmp_path / "runs" / "r").exists()
