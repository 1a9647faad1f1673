"""A garbled run database is bad input on the dashboard (issue 21 item 7): one st.error line naming the
file and the rebuild command, no exception or traceback, and the other runs can still be picked.

The damage is real: bytes overwritten inside a data block of one table of a copy of a shipped run, found
with DuckDB's own storage map (`pragma_storage_info`), so DuckDB's block checksum fails when, and only
when, a query reads that table.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pytest
from conftest import PAGE_TITLES, REPO, app_on
from streamlit.testing.v1 import AppTest

from knnlm_core import store

APP = str(REPO / "app.py")
SOURCE = REPO / "data" / "runs" / "demo-shakespeare" / store.DB_NAME  # the smaller shipped run, garbled
GOOD = REPO / "data" / "runs" / "demo" / store.DB_NAME  # holds the datastore tokens SOURCE reads
FILE_HEADER = 3 * 4096  # DuckDB's file starts with three 4 KiB headers, then fixed-size blocks
BLOCK_CHECKSUM = 8  # each block begins with its 8-byte checksum


def garble_table(db: Path, table: str, n_bytes: int = 64) -> int:
    """Overwrite `n_bytes` of the first data segment of `table` in the DuckDB file `db`; the file offset."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        block_size = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
        block, offset = con.execute("SELECT block_id, block_offset FROM pragma_storage_info(?) WHERE block_id >= 0 "
                                    "ORDER BY block_id, block_offset LIMIT 1", [table]).fetchone()
    finally:
        con.close()
    where = FILE_HEADER + block * block_size + BLOCK_CHECKSUM + offset
    with open(db, "r+b") as f:
        f.seek(where)
        f.write(b"\xaa" * n_bytes)
    return where


def reads(db: Path, table: str) -> bool:
    """Whether every stored value of `table` reads back (plain DuckDB, independent of knnlm_core)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        con.execute(f'SELECT sum(hash(COLUMNS(*))) FROM "{table}"').fetchall()
        return True
    except duckdb.Error:
        return False
    finally:
        con.close()


def runs_with_garbled(root: Path, table: str) -> Path:
    """`root` holding `demo` (a copy of the shipped run, whose datastore tokens the other reads) and `bad` (a
    copy of the shipped out-of-domain run whose `table` is garbled)."""
    for name, source in (("demo", GOOD), ("bad", SOURCE)):
        (root / name).mkdir(parents=True)
        shutil.copyfile(source, root / name / store.DB_NAME)
    bad = root / "bad" / store.DB_NAME
    garble_table(bad, table)
    other = "vocab" if table != "vocab" else "run"
    assert not reads(bad, table) and reads(bad, other), "the damage must hit exactly the garbled table"
    return root


@pytest.fixture
def garbled_runs(tmp_path, monkeypatch, request):
    yield from app_on(runs_with_garbled(tmp_path / "runs", request.param), monkeypatch)


def _one_line_error(at: AppTest, db: Path) -> str:
    """The page's only error box, checked to be one line naming `db` and the rebuild command."""
    assert not at.exception, [e.message for e in at.exception]
    errors = [str(e.value) for e in at.error]
    assert len(errors) == 1, errors
    text = errors[0]
    assert "\n" not in text and "Traceback" not in text, text
    assert f"{db}` is garbled" in text and "python -m precompute" in text and "--overwrite" in text, text
    assert "Corrupt database file" in text, text  # DuckDB's reason, quoted
    return text


@pytest.mark.parametrize("garbled_runs", ["eval_tokens", "run"], indirect=True)
def test_garbled_run_is_one_line_and_other_runs_still_open(garbled_runs):
    """eval_tokens: the run card opens, the Overview's first query meets the damage; run: the run card
    itself cannot be read. Either way one error line, then picking the intact run draws its Overview."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = "bad"
    at.run()
    _one_line_error(at, garbled_runs / "bad" / store.DB_NAME)
    at.selectbox(key="run").set_value("demo").run()
    assert not at.exception and not at.error, [str(e.value) for e in at.error]
    assert [t.value for t in at.title] == [PAGE_TITLES["overview"]]


@pytest.mark.parametrize("garbled_runs", ["eval_tokens"], indirect=True)
def test_compare_names_the_garbled_second_run(garbled_runs):
    """The Compare page reads two runs: the error names the garbled one even when it is not the picked run."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = "demo"
    at.run()
    at.switch_page("pages/compare.py").run()
    _one_line_error(at, garbled_runs / "bad" / store.DB_NAME)  # its second run defaults to the other one


def test_store_turns_damage_into_bad_input(tmp_path):
    """knnlm_core.store: open_readonly(check=True) and check_file raise CorruptRunError (a ValueError, one line,
    naming the file and the fix) for a garbled block; the undamaged copy passes; plain open defers the damage."""
    root = runs_with_garbled(tmp_path, "lm_top")
    bad, good = root / "bad" / store.DB_NAME, root / "demo" / store.DB_NAME
    store.check_file(good)
    store.open_readonly(good, check=True).close()
    con = store.open_readonly(bad)  # the damaged block is not read yet
    with pytest.raises(store.CorruptRunError), store.corruption_is_bad_input(bad):
        con.execute("SELECT sum(hash(COLUMNS(*))) FROM lm_top").fetchall()
    con.close()
    for call in (lambda: store.check_file(bad, config="c.toml"), lambda: store.open_readonly(bad, check=True)):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert isinstance(err.value, store.CorruptRunError) and "\n" not in message
        assert f"{bad} is garbled (Corrupt database file" in message and "--overwrite" in message
    with pytest.raises(duckdb.Error), store.corruption_is_bad_input(bad):  # other errors pass unchanged
        duckdb.connect(":memory:").execute("SELECT * FROM no_such_table")
