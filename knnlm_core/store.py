"""DuckDB storage of a run (SPEC §7): schema, atomic writer, read-only opener.

Tables hold at least the SPEC §7 columns; extensions are documented in docs/SCHEMA.md
(`lm_top`, `knn_top`, `vocab`, and extra columns such as `context_token_id`). Writers
build `metrics.duckdb.tmp`, CHECKPOINT, close and rename, so readers never see a partial
file. Tables are written ordered by their lookup key (`pos`, `token_id`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import schema

SCHEMA_VERSION = 4  # 3: documents (SPEC §11): eval_tokens.doc_id, documents, doc_bin_stats, run.doc_mode
# 4: context novelty (SPEC §12): eval_tokens.ctx_match_len / p_inf / inf_suffix_len / inf_count / copy_share,
#    neighbors.overlap, the ∞-gram variant; the neighbour blocks (SPEC §7) in the run directory
DB_NAME = "metrics.duckdb"
# The schema is declared once in knnlm_core/schema.py (columns, types, SPEC sections, stages; docs/SCHEMA.md
# is checked against it); the DDL and the typed views below are built from that declaration.
HIT_KS, RECALL_KS = schema.HIT_KS, schema.RECALL_KS
SCHEMA_SQL = schema.ddl()

# Table -> ORDER BY used when writing (lookup keys first).
TABLE_ORDER = {t.name: t.order for t in schema.TABLES}


# Optional SPEC §9 tables (present when the run has a validation corpus), stored compactly because
# every block counts in the shipped demo: per-position λ (always a multiple of 0.01) as UTINYINT
# percent in `mitigation_tokens_data` behind the view `mitigation_tokens` (λ = pct / 100.0, the
# same double as the grid's i / 100), and the two small tables as views over constant VALUES
# (no data blocks). Readers see three relations with the columns of docs/SCHEMA.md.
OPTIONAL_TABLES = ("mitigations", "mitigation_tokens", "adaptive_lambda")
PERCENT_SUFFIX = "_pct"


def _sql_literal(value) -> str:
    """A value as a DuckDB SQL literal (strings quoted and escaped, NaN / None -> NULL, ±inf typed)."""
    if value is None or (isinstance(value, float) and value != value):
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        return f"'{value!r}'::DOUBLE" if value in (float("inf"), float("-inf")) else f"{value!r}::DOUBLE"
    return str(int(value))


def _values_view(con: duckdb.DuckDBPyConnection, name: str, frame: pd.DataFrame, types: dict[str, str]) -> None:
    """CREATE VIEW name AS a typed VALUES list of `frame`'s rows (a small constant table, no data blocks)."""
    rows = ", ".join("(" + ", ".join(_sql_literal(v.item() if hasattr(v, "item") else v) for v in row) + ")"
                     for row in frame[list(types)].itertuples(index=False))
    cols = ", ".join(f'"{c}"' for c in types)
    casts = ", ".join(f'CAST("{c}" AS {t}) AS "{c}"' for c, t in types.items())
    con.execute(f"CREATE VIEW {name} AS SELECT {casts} FROM (VALUES {rows}) AS t({cols})")


MITIGATION_TYPES, RULE_TYPES = schema.types("mitigations"), schema.types("adaptive_lambda")


def write_mitigations(con: duckdb.DuckDBPyConnection, tables: dict[str, pd.DataFrame]) -> None:
    """The three SPEC §9 relations (see OPTIONAL_TABLES) from their frames."""
    variants = tables["mitigations"].reset_index(drop=True).assign(ord=lambda f: range(len(f)))
    _values_view(con, "mitigations", variants, MITIGATION_TYPES)
    _values_view(con, "adaptive_lambda", tables["adaptive_lambda"], RULE_TYPES)
    tokens = tables["mitigation_tokens"].copy()
    lam_cols = [c for c in tokens.columns if c.startswith("lam_")]
    for c in lam_cols:
        pct = np.rint(tokens[c].to_numpy(np.float64) * 100)
        if not np.array_equal(pct / 100.0, tokens[c].to_numpy(np.float64)) or pct.min() < 0 or pct.max() > 100:
            raise ValueError(f"mitigation_tokens.{c} holds a λ off the 0.01 grid; store it as REAL instead")
        tokens[c + PERCENT_SUFFIX] = pct.astype(np.uint8)
    data = tokens.drop(columns=lam_cols)  # noqa: F841 (read by DuckDB's replacement scan)
    con.execute("CREATE TABLE mitigation_tokens_data AS SELECT * FROM data ORDER BY pos")
    keep = ", ".join(f'"{c}"' for c in tokens.columns if c not in lam_cols and not c.endswith(PERCENT_SUFFIX))
    lams = "".join(f', "{c}{PERCENT_SUFFIX}" / 100.0 AS "{c}"' for c in lam_cols)
    con.execute(f"CREATE VIEW mitigation_tokens AS SELECT {keep}{lams} FROM mitigation_tokens_data")


DOCUMENT_TYPES = schema.types("documents")

# SPEC §11: per (document, frequency bin) sums behind every per-bin figure, so that a bootstrap is a
# resampling of these rows (knnlm_core.bootstrap). A view: it costs the shipped runs no data block.
DOC_BIN_STATS_SQL = f"""
CREATE VIEW doc_bin_stats AS
SELECT e.doc_id, e.freq_bin, count(*) AS n_tokens,
       sum(e.nll_lm) AS sum_nll_lm, sum(e.nll_knnlm) AS sum_nll_knnlm,
       sum(e.p_lm) AS sum_p_lm, sum(e.p_knn) AS sum_p_knn, sum((e.gain < 0)::INTEGER) AS n_harmed,
       {", ".join(f"sum(e.hit_{k}::INTEGER) AS n_hit_{k}" for k in HIT_KS)},
       {", ".join(f"sum(e.recall_{k}) AS sum_recall_{k}" for k in RECALL_KS)},
       {", ".join(f"sum(-ln(r.lam * e.p_knn_{s} + (1 - r.lam) * e.p_lm)) AS sum_nll_{s}" for s in schema.EXACT_SETTINGS)}
FROM eval_tokens e, (SELECT "lambda" AS lam FROM run) r
GROUP BY e.doc_id, e.freq_bin
"""


def write_documents(con: duckdb.DuckDBPyConnection, documents: pd.DataFrame) -> None:
    """The `documents` relation (a VALUES view: no data block) and the `doc_bin_stats` view."""
    _values_view(con, "documents", documents, DOCUMENT_TYPES)
    con.execute(DOC_BIN_STATS_SQL)


SHARED_DATASTORE = "shared_ds"  # catalog alias of the run whose datastore_tokens a run shares


class RunSchemaError(RuntimeError):
    """The run's database is missing, unreadable or from another schema version."""


def write_database(path: Path, tables: dict[str, pd.DataFrame], datastore_from: Path | None = None) -> Path:
    """Write all tables to `path` atomically (temp file, CHECKPOINT, rename).

    With `datastore_from` (another run's database with the same datastore), `datastore_tokens`
    is not stored but a view on that run's table, which `open_readonly` attaches.
    """
    missing = set(TABLE_ORDER) - set(tables) - ({"datastore_tokens"} if datastore_from else set())
    missing |= {"documents"} - set(tables)
    if missing:
        raise ValueError(f"tables missing from the run: {sorted(missing)}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        con.execute(SCHEMA_SQL)
        if datastore_from is not None:
            con.execute("DROP TABLE datastore_tokens")
            con.execute(f"ATTACH ? AS {SHARED_DATASTORE} (READ_ONLY)", [str(datastore_from)])
            con.execute(f"CREATE VIEW datastore_tokens AS SELECT * FROM {SHARED_DATASTORE}.datastore_tokens")
            con.execute(f"DETACH {SHARED_DATASTORE}")
        for name, order in TABLE_ORDER.items():
            if datastore_from is not None and name == "datastore_tokens":
                continue
            frame = tables[name]  # noqa: F841 (read by DuckDB's replacement scan)
            cols = ", ".join(f'"{c}"' for c in con.execute(f"SELECT * FROM {name} LIMIT 0").fetchdf().columns)
            order_sql = f" ORDER BY {order}" if order else ""
            con.execute(f"INSERT INTO {name} SELECT {cols} FROM frame{order_sql}")
        if "mitigations" in tables:
            write_mitigations(con, tables)
        write_documents(con, tables["documents"])
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- damaged files (bad input, not bugs)
# What DuckDB 2.0 raises for a damaged run file (found by overwriting bytes of real run files): a block whose
# checksum does not match is a plain duckdb.Error "Corrupt database file: computed checksum ... in block at
# location N", raised when the block is read (at connect for a catalog block, else by the first query that reads
# it); a truncated file is a duckdb.IOException "Could not read enough bytes from file"; a damaged header an
# IOException "... is not a valid DuckDB database file". Other errors (a SQL bug, a lock held by a writer) are not
# damage and pass unchanged.
CORRUPTION_MARKS = ("Corrupt database file", "Could not read enough bytes", "not a valid DuckDB database file")


class CorruptRunError(RunSchemaError, ValueError):
    """A run database whose bytes are damaged: bad input (a ValueError), one line naming the file and the fix."""


def is_corruption(err: BaseException) -> bool:
    """Whether `err` is DuckDB's report of a damaged database file (see CORRUPTION_MARKS)."""
    return isinstance(err, duckdb.Error) and any(mark in str(err) for mark in CORRUPTION_MARKS)


def corrupt_error(path: Path, err: BaseException, config: str = "...") -> CorruptRunError:
    """The one-line CorruptRunError for damaged file `path`: DuckDB's first line and the rebuild command."""
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return CorruptRunError(f"{path} is garbled ({reason}): rebuild it with `python -m precompute --config {config} "
                           f"--run-dir {Path(path).parent} --overwrite` (the other stages' outputs are reused)")


@contextmanager
def corruption_is_bad_input(path: Path, config: str = "...") -> Iterator[None]:
    """Inside this block, DuckDB's damage errors become `corrupt_error(path)` (for any reader of `path`)."""
    try:
        yield
    except duckdb.Error as err:
        if is_corruption(err):
            raise corrupt_error(Path(path), err, config) from err
        raise


def check_readable(con: duckdb.DuckDBPyConnection, path: Path, config: str = "...") -> None:
    """Read every stored value of every table of `con` once; CorruptRunError naming `path` on a damaged block.

    count(*) and min / max are answered from DuckDB's metadata and statistics without reading data blocks, so
    every column is hashed instead (the shipped demo: ~0.3 s on 2 cores). Views are left out (they read tables).
    """
    with corruption_is_bad_input(path, config):
        tables = con.execute("SELECT database_name, schema_name, table_name FROM duckdb_tables() "
                             "WHERE database_name = current_database() ORDER BY table_name").fetchall()
        for db, sch, table in tables:
            con.execute(f'SELECT sum(hash(COLUMNS(*))) FROM "{db}"."{sch}"."{table}"').fetchall()


def check_file(path: Path, config: str = "...") -> None:
    """Raise CorruptRunError when the run database at `path` is damaged anywhere (see check_readable); other
    failures to open it (a lock held by a writer) are not damage and are left to the caller's own checks."""
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as err:
        if is_corruption(err):
            raise corrupt_error(Path(path), err, config) from err
        return
    try:
        check_readable(con, Path(path), config)
    finally:
        con.close()


def open_readonly(path: Path, check: bool = False) -> duckdb.DuckDBPyConnection:
    """Read-only connection to a run database; RunSchemaError if absent, unreadable or outdated, CorruptRunError
    (also a ValueError) if damaged. With `check`, every stored value is read once first (check_readable), so a
    damaged block anywhere is found here; without it, wrap later reads in `corruption_is_bad_input(path)`."""
    path = Path(path)
    if not path.is_file():
        raise RunSchemaError(f"no {DB_NAME} at {path.parent} (build the run with `python -m precompute`)")
    try:
        con = duckdb.connect(str(path), read_only=True)
        version = con.execute("SELECT schema_version FROM run").fetchone()
    except duckdb.Error as err:
        if "con" in locals():
            con.close()
        if is_corruption(err):
            raise corrupt_error(path, err) from err
        raise RunSchemaError(f"{path} is not a readable run database ({str(err).splitlines()[0]}); rebuild it") from err
    if version is None or version[0] != SCHEMA_VERSION:
        con.close()
        found = None if version is None else version[0]
        raise RunSchemaError(
            f"run at {path.parent} has schema version {found}, this app reads {SCHEMA_VERSION}: rebuild it with "
            "`python -m precompute --config ... --run-dir ... --overwrite` (finished stages whose inputs did not "
            "change are reused)"
        )
    try:
        shared = con.execute("SELECT datastore_tokens_from FROM run").fetchone()[0]
    except duckdb.Error as err:
        con.close()
        if is_corruption(err):
            raise corrupt_error(path, err) from err
        raise RunSchemaError(f"{path} lacks columns of schema version {SCHEMA_VERSION} ({str(err).splitlines()[0]}); "
                             "rebuild it with `python -m precompute --config ... --run-dir ... --overwrite`") from err
    if shared:
        other = (path.parent / shared).resolve()
        if not other.is_file():
            con.close()
            raise RunSchemaError(f"run at {path.parent} reads its datastore tokens from {shared}, which is missing: "
                                 "restore that run or rebuild this one without datastore_tokens_from")
        # DuckDB shares one database instance per file within a process: a second connection to the same run
        # already sees the attachment (attaching again raises "already exists").
        attached = {r[0] for r in con.execute("SELECT database_name FROM duckdb_databases()").fetchall()}
        if SHARED_DATASTORE not in attached:
            con.execute(f"ATTACH ? AS {SHARED_DATASTORE} (READ_ONLY)", [str(other)])
    if check:
        try:
            check_readable(con, path)
        except CorruptRunError:
            con.close()
            raise
    return con
