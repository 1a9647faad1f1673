"""Tests of knnlm_core.store (SPEC §7): atomic DuckDB writer and the read-only, version-checked opener."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pandas as pd
import pytest

from knnlm_core import schema, store
from knnlm_core.store import DB_NAME, HIT_KS, SCHEMA_VERSION, RunSchemaError, open_readonly, write_database


def schema_columns() -> dict[str, list[str]]:
    """Column names of every table, from the one declaration (knnlm_core/schema.py; the SPEC §7 columns and the
    DDL are checked against it in tests/test_schema.py)."""
    return {t.name: [c.name for c in t.columns] for t in schema.TABLES}


def make_tables(n_eval: int = 5, version: int = SCHEMA_VERSION, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Minimal valid tables; eval_tokens and neighbors rows are shuffled to check the write order."""
    rng = np.random.default_rng(seed)
    cols = schema_columns()
    run = {c: [None] for c in cols["run"]}
    run.update(run_name=["t"], model=["m"], n_entries=[100], n_eval=[n_eval], k=[8], temperature=[10.0],
               schema_version=[version])
    run["lambda"] = [0.25]
    pos = rng.permutation(n_eval)
    ev = {c: np.zeros(n_eval) for c in cols["eval_tokens"]}
    ev.update(pos=pos, token_id=pos + 10, token=[f"tok{p}" for p in pos], p_lm=pos / 10.0)
    ev.update({f"hit_{k}": pos % 2 == 0 for k in HIT_KS})
    nb_pos = np.repeat(pos, 2)
    nb = {c: np.zeros(2 * n_eval) for c in cols["neighbors"]}
    nb.update(pos=nb_pos, rank=np.tile([2, 1], n_eval), entry=np.arange(2 * n_eval))
    tables = {
        "run": pd.DataFrame(run),
        "eval_tokens": pd.DataFrame(ev),
        "token_types": pd.DataFrame({c: [3, 1] if c == "token_id" else [0, 0] for c in cols["token_types"]}).assign(
            token=["c", "a"]),
        "neighbors": pd.DataFrame(nb),
        "datastore_tokens": pd.DataFrame({"pos": [2, 0, 1], "token_id": [7, 8, 9]}),
        "lm_top": pd.DataFrame({"pos": [0], "rank": [1], "token_id": [4], "p_lm": [0.5]}),
        "knn_top": pd.DataFrame({"pos": [0], "rank": [1], "token_id": [4], "p_knn": [0.5]}),
        "vocab": pd.DataFrame({"token_id": [1, 0], "token": ["b", "a"]}),
        "exact_neighbors": pd.DataFrame({"pos": [0], "rank": [1], "entry": [3], "distance": [1.5]}),
        "eval_words": pd.DataFrame({c: [0] for c in cols["eval_words"]}).assign(word=["w"]),
        "documents": pd.DataFrame({"doc_id": [0], "first_pos": [0], "n_positions": [n_eval], "title": ["it's"]}),
    }
    return tables


def test_write_and_read_back(tmp_path):
    path = write_database(tmp_path / DB_NAME, make_tables())
    assert path == tmp_path / DB_NAME
    con = open_readonly(path)
    try:
        assert con.execute("SELECT run_name, k, \"lambda\", schema_version FROM run").fetchall() == [
            ("t", 8, 0.25, SCHEMA_VERSION)]
        # rows are written ordered by their lookup keys
        assert [r[0] for r in con.execute("SELECT pos FROM eval_tokens").fetchall()] == list(range(5))
        row = con.execute("SELECT token, p_lm, hit_1 FROM eval_tokens WHERE pos = 3").fetchone()
        assert row == ("tok3", 0.3, False)
        nb = con.execute("SELECT pos, rank FROM neighbors").fetchall()
        assert nb == sorted(nb) and len(nb) == 10
        assert [r[0] for r in con.execute("SELECT token_id FROM token_types").fetchall()] == [1, 3]
        assert con.execute("SELECT * FROM datastore_tokens").fetchall() == [(0, 8), (1, 9), (2, 7)]
    finally:
        con.close()


def test_write_is_temp_then_rename(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((str(src), str(dst), os.path.exists(src), os.path.exists(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", spy)
    target = tmp_path / DB_NAME
    write_database(target, make_tables())
    assert calls == [(str(target) + ".tmp", str(target), True, False)]  # target appears only via rename
    assert not (tmp_path / (DB_NAME + ".tmp")).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]


def test_stale_temp_file_is_replaced(tmp_path):
    (tmp_path / (DB_NAME + ".tmp")).write_bytes(b"left over from a crash")
    write_database(tmp_path / DB_NAME, make_tables())
    assert not (tmp_path / (DB_NAME + ".tmp")).exists()
    open_readonly(tmp_path / DB_NAME).close()


def test_overwrite_replaces_whole_file(tmp_path):
    path = tmp_path / DB_NAME
    write_database(path, make_tables(n_eval=5))
    write_database(path, make_tables(n_eval=3, seed=1))
    con = open_readonly(path)
    assert con.execute("SELECT count(*) FROM eval_tokens").fetchone()[0] == 3
    con.close()


def test_failed_write_keeps_the_old_database(tmp_path):
    path = tmp_path / DB_NAME
    write_database(path, make_tables(n_eval=4))
    before = path.read_bytes()
    bad = make_tables()
    bad["eval_tokens"] = bad["eval_tokens"].drop(columns=["gain"])
    with pytest.raises(duckdb.Error):
        write_database(path, bad)
    assert path.read_bytes() == before
    con = open_readonly(path)
    assert con.execute("SELECT count(*) FROM eval_tokens").fetchone()[0] == 4
    con.close()


def test_missing_tables_rejected(tmp_path):
    tables = make_tables()
    del tables["vocab"], tables["lm_top"]
    with pytest.raises(ValueError, match="lm_top.*vocab"):
        write_database(tmp_path / DB_NAME, tables)
    assert not any(tmp_path.iterdir())


def test_open_readonly_is_read_only(tmp_path):
    con = open_readonly(write_database(tmp_path / DB_NAME, make_tables()))
    with pytest.raises(duckdb.Error):
        con.execute("CREATE TABLE x (a INTEGER)")
    con.close()


def test_open_missing_file(tmp_path):
    with pytest.raises(RunSchemaError, match="no metrics.duckdb"):
        open_readonly(tmp_path / DB_NAME)


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1])
def test_open_wrong_schema_version(tmp_path, version):
    path = write_database(tmp_path / DB_NAME, make_tables(version=version))
    with pytest.raises(RunSchemaError, match=f"schema version {version}.*rebuild"):
        open_readonly(path)


def test_open_empty_run_table(tmp_path):
    tables = make_tables()
    tables["run"] = tables["run"].iloc[:0]
    path = write_database(tmp_path / DB_NAME, tables)
    with pytest.raises(RunSchemaError, match="schema version None"):
        open_readonly(path)


def test_open_corrupt_file(tmp_path):
    path = tmp_path / DB_NAME
    path.write_bytes(np.random.default_rng(0).bytes(20000))
    with pytest.raises(store.CorruptRunError, match=f"{DB_NAME} is garbled .*not a valid DuckDB database file.*"
                                                    "--overwrite"):
        open_readonly(path)


def test_open_database_without_run_table(tmp_path):
    path = tmp_path / DB_NAME
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE other (a INTEGER)")
    con.close()
    with pytest.raises(RunSchemaError, match="rebuild"):
        open_readonly(path)


def test_shared_datastore_tokens_are_a_view_on_the_other_run(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_database(tmp_path / "a" / DB_NAME, make_tables())
    tables = make_tables(seed=1)
    del tables["datastore_tokens"]
    tables["run"]["datastore_tokens_from"] = ["../a/metrics.duckdb"]
    write_database(tmp_path / "b" / DB_NAME, tables, datastore_from=tmp_path / "a" / DB_NAME)
    con = open_readonly(tmp_path / "b" / DB_NAME)
    assert con.execute("SELECT token_id FROM datastore_tokens ORDER BY pos").fetchall() == [(8,), (9,), (7,)]
    assert con.cursor().execute("SELECT count(*) FROM datastore_tokens").fetchone()[0] == 3  # cursors see it too
    con.close()
    (tmp_path / "a" / DB_NAME).unlink()
    with pytest.raises(RunSchemaError, match="reads its datastore tokens from ../a/metrics.duckdb, which is missing"):
        open_readonly(tmp_path / "b" / DB_NAME)


def test_database_stage_refuses_a_run_with_another_datastore(tmp_path):
    from types import SimpleNamespace

    from precompute.runner import RunError
    from precompute.stages.database import shared_datastore

    (tmp_path / "a").mkdir()
    tables = make_tables()
    tables["run"]["datastore_sha256"] = ["abc"]
    write_database(tmp_path / "a" / DB_NAME, tables)
    run = SimpleNamespace(cfg=SimpleNamespace(datastore_tokens_from="../a/metrics.duckdb"), run_dir=tmp_path / "b")
    assert shared_datastore(run, "abc") == (tmp_path / "a" / DB_NAME).resolve()
    with pytest.raises(RunError, match="built on another datastore"):
        shared_datastore(run, "def")
    run.cfg.datastore_tokens_from = "../missing/metrics.duckdb"
    with pytest.raises(RunError, match="not a readable run database"):
        shared_datastore(run, "abc")
    run.cfg.datastore_tokens_from = ""
    assert shared_datastore(run, "abc") is None
