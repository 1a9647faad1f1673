"""DuckDB storage of a run (SPEC §7): schema, atomic writer, read-only opener.

Tables hold at least the SPEC §7 columns; extensions are documented in docs/SCHEMA.md
(`lm_top`, `knn_top`, `vocab`, and extra columns such as `context_token_id`). Writers
build `metrics.duckdb.tmp`, CHECKPOINT, close and rename, so readers never see a partial
file. Tables are written ordered by their lookup key (`pos`, `token_id`).
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

SCHEMA_VERSION = 4  # 3: documents (SPEC §11): eval_tokens.doc_id, documents, doc_bin_stats, run.doc_mode
# 4: context novelty (SPEC §12): eval_tokens.ctx_match_len / p_inf / inf_suffix_len / inf_count / copy_share,
#    neighbors.overlap, the ∞-gram variant; the neighbour blocks (SPEC §7) in the run directory
DB_NAME = "metrics.duckdb"
HIT_KS = (1, 8, 16, 64, 256, 1024)
RECALL_KS = (16, 64, 1024)  # SPEC §8: recall@k for those <= the run's k

SCHEMA_SQL = f"""
CREATE TABLE run (
    run_name VARCHAR, model VARCHAR, n_entries BIGINT, n_eval BIGINT, dim INTEGER,
    index_factory VARCHAR, nprobe INTEGER, k INTEGER, temperature DOUBLE, "lambda" DOUBLE,
    distance_source VARCHAR, ppl_lm DOUBLE, ppl_knnlm DOUBLE,
    schema_version INTEGER, store_neighbors INTEGER, hook_point VARCHAR, contamination_mode VARCHAR,
    datastore_corpus VARCHAR, eval_corpus VARCHAR, created_at VARCHAR, config_json VARCHAR,
    eval_domain VARCHAR, exact_search BOOLEAN, datastore_sha256 VARCHAR, datastore_tokens_from VARCHAR,
    n_docs INTEGER, doc_mode VARCHAR, doc_block_tokens INTEGER
);
CREATE TABLE eval_tokens (
    pos INTEGER, token_id INTEGER, token VARCHAR, freq BIGINT, freq_bin SMALLINT,
    p_lm DOUBLE, p_knn DOUBLE, p_knnlm DOUBLE, nll_lm DOUBLE, nll_knnlm DOUBLE, gain DOUBLE,
    {", ".join(f"hit_{k} BOOLEAN" for k in HIT_KS)},
    target_rank INTEGER, n_target INTEGER, query_pq_error DOUBLE, context_freq BIGINT,
    context_token_id INTEGER, knn_log_z DOUBLE,
    recall_16 DOUBLE, recall_64 DOUBLE, recall_1024 DOUBLE,
    p_knn_ivf_pq DOUBLE, p_knn_ivf_exact DOUBLE, p_knn_exact DOUBLE, exact_target_rank INTEGER, doc_id INTEGER,
    ctx_match_len SMALLINT, p_inf DOUBLE, inf_suffix_len SMALLINT, inf_count BIGINT, copy_share DOUBLE
);
CREATE TABLE token_types (
    token_id INTEGER, token VARCHAR, freq BIGINT, freq_bin SMALLINT, cv DOUBLE, contamination DOUBLE,
    pq_error_mean DOUBLE, pq_error_max DOUBLE, eval_count BIGINT
);
CREATE TABLE neighbors (
    pos INTEGER, rank SMALLINT, entry BIGINT, token_id INTEGER, distance_pq REAL, distance_exact REAL,
    overlap SMALLINT
);
CREATE TABLE exact_neighbors (pos INTEGER, rank SMALLINT, entry BIGINT, distance REAL);
CREATE TABLE eval_words (
    word_idx INTEGER, word VARCHAR, first_pos INTEGER, n_tokens SMALLINT, freq BIGINT, freq_bin SMALLINT,
    nll_lm DOUBLE, nll_knnlm DOUBLE
);
CREATE TABLE datastore_tokens (pos BIGINT, token_id INTEGER);
CREATE TABLE lm_top (pos INTEGER, rank SMALLINT, token_id INTEGER, p_lm REAL);
CREATE TABLE knn_top (pos INTEGER, rank SMALLINT, token_id INTEGER, p_knn REAL);
CREATE TABLE vocab (token_id INTEGER, token VARCHAR);
"""

# Table -> ORDER BY used when writing (lookup keys first).
TABLE_ORDER = {
    "run": None,
    "eval_tokens": "pos",
    "token_types": "token_id",
    "neighbors": "pos, rank",
    "exact_neighbors": "pos, rank",
    "eval_words": "word_idx",
    "datastore_tokens": "pos",
    "lm_top": "pos, rank",
    "knn_top": "pos, rank",
    "vocab": "token_id",
}


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


MITIGATION_TYPES = {
    "ord": "INTEGER", "variant": "VARCHAR", "label": "VARCHAR", "family": "VARCHAR", "tau": "DOUBLE",
    "lam": "DOUBLE", "p_knn_column": "VARCHAR", "lam_column": "VARCHAR", "eps": "DOUBLE", "valid_ppl_lm": "DOUBLE",
    "valid_ppl": "DOUBLE", "ppl": "DOUBLE", "notes": "VARCHAR",
}
RULE_TYPES = {"variant": "VARCHAR", "bin": "INTEGER", "lo": "DOUBLE", "hi": "DOUBLE", "lam": "DOUBLE",
              "n_valid": "INTEGER"}


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


DOCUMENT_TYPES = {"doc_id": "INTEGER", "first_pos": "INTEGER", "n_positions": "INTEGER", "title": "VARCHAR"}

# SPEC §11: per (document, frequency bin) sums behind every per-bin figure, so that a bootstrap is a
# resampling of these rows (knnlm_core.bootstrap). A view: it costs the shipped runs no data block.
DOC_BIN_STATS_SQL = f"""
CREATE VIEW doc_bin_stats AS
SELECT e.doc_id, e.freq_bin, count(*) AS n_tokens,
       sum(e.nll_lm) AS sum_nll_lm, sum(e.nll_knnlm) AS sum_nll_knnlm,
       sum(e.p_lm) AS sum_p_lm, sum(e.p_knn) AS sum_p_knn, sum((e.gain < 0)::INTEGER) AS n_harmed,
       {", ".join(f"sum(e.hit_{k}::INTEGER) AS n_hit_{k}" for k in HIT_KS)},
       sum(e.recall_16) AS sum_recall_16, sum(e.recall_64) AS sum_recall_64, sum(e.recall_1024) AS sum_recall_1024,
       {", ".join(f"sum(-ln(r.lam * e.{c} + (1 - r.lam) * e.p_lm)) AS sum_nll_{c[6:]}"
                  for c in ("p_knn_ivf_pq", "p_knn_ivf_exact", "p_knn_exact"))}
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


def open_readonly(path: Path) -> duckdb.DuckDBPyConnection:
    """Read-only connection to a run database; RunSchemaError if absent, corrupt or outdated."""
    path = Path(path)
    if not path.is_file():
        raise RunSchemaError(f"no {DB_NAME} at {path.parent} (build the run with `python -m precompute`)")
    try:
        con = duckdb.connect(str(path), read_only=True)
        version = con.execute("SELECT schema_version FROM run").fetchone()
    except duckdb.Error as err:
        if "con" in locals():
            con.close()
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
        raise RunSchemaError(f"{path} lacks columns of schema version {SCHEMA_VERSION} ({str(err).splitlines()[0]}); "
                             "rebuild it with `python -m precompute --config ... --run-dir ... --overwrite`") from err
    if shared:
        other = (path.parent / shared).resolve()
        if not other.is_file():
            con.close()
            raise RunSchemaError(f"run at {path.parent} reads its datastore tokens from {shared}, which is missing: "
                                 "restore that run or rebuild this one without datastore_tokens_from")
        con.execute(f"ATTACH ? AS {SHARED_DATASTORE} (READ_ONLY)", [str(other)])
    return con
