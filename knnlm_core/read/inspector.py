"""The neighbour inspector (SPEC §6, §12): one evaluation position, its context, its top predictions and its
stored neighbours with their datastore contexts and overlaps."""

from __future__ import annotations

import duckdb
import pandas as pd

from knnlm_core import infgram
from knnlm_core.read.ci import GROUPS
from knnlm_core.read.run import _df

CONTEXT_WIDTH = 64  # context tokens the neighbour inspector shows before a position


def default_position(cur: duckdb.DuckDBPyConnection, width: int = CONTEXT_WIDTH) -> int:
    """The neighbour inspector's first view when the URL names no position: among positions with a full
    `width`-token context (pos >= width - 1), the one whose target is rare (ci.GROUPS['rare']:
    1 <= datastore freq < 1,000) with the largest |gain| (kNN-LM changes its NLL most); without a rare
    target, the largest |gain| of any; ties to the lowest position; 0 for an empty run."""
    lo, hi = GROUPS["rare"]
    sql = """SELECT pos FROM eval_tokens WHERE pos >= ? AND gain IS NOT NULL AND isfinite(gain)
             ORDER BY (freq_bin BETWEEN ? AND ?) DESC, abs(gain) DESC, pos LIMIT 1"""
    row = cur.execute(sql, [int(width) - 1, lo, hi]).fetchone()
    if row is None:  # fewer positions than a full context: the whole run
        row = cur.execute("SELECT pos FROM eval_tokens ORDER BY abs(gain) DESC NULLS LAST, pos LIMIT 1").fetchone()
    return 0 if row is None else int(row[0])


def eval_row(cur: duckdb.DuckDBPyConnection, pos: int) -> dict:
    """Every column of eval_tokens at `pos` ({} when out of range)."""
    df = _df(cur, "SELECT * FROM eval_tokens WHERE pos = ?", [int(pos)])
    return {} if df.empty else df.iloc[0].to_dict()


def eval_context(cur: duckdb.DuckDBPyConnection, pos: int, width: int = 64) -> pd.DataFrame:
    """Left context of `pos`: stream tokens pos-width+1..pos (`context_token_id`), decoded."""
    sql = """SELECT e.pos, e.context_token_id AS token_id, v.token FROM eval_tokens e
             LEFT JOIN vocab v ON v.token_id = e.context_token_id
             WHERE e.pos BETWEEN ? AND ? ORDER BY e.pos"""
    return _df(cur, sql, [int(pos) - int(width) + 1, int(pos)])


def top_predictions(cur: duckdb.DuckDBPyConnection, pos: int, which: str) -> pd.DataFrame:
    """Top LM (`which='lm'`) or kNN (`'knn'`) predictions at `pos`: rank, token_id, token, p."""
    table, col = {"lm": ("lm_top", "p_lm"), "knn": ("knn_top", "p_knn")}[which]
    sql = f"""SELECT t.rank, t.token_id, v.token, t.{col} AS p FROM {table} t
              LEFT JOIN vocab v USING (token_id) WHERE t.pos = ? ORDER BY t.rank"""
    return _df(cur, sql, [int(pos)])


def neighbors(cur: duckdb.DuckDBPyConnection, pos: int, width: int = 12) -> pd.DataFrame:
    """Stored neighbours of `pos` with rank, entry, value token, distances, context overlap with the
    query (SPEC §12) and whether that makes it a copy neighbour (overlap >= infgram.COPY_MIN_OVERLAP),
    and each entry's left context (datastore_tokens pos in [entry - width + 1, entry]) in one set-based query."""
    sql = """
    WITH n AS (SELECT rank, entry, token_id, distance_pq, distance_exact, overlap FROM neighbors WHERE pos = ?),
    o AS (SELECT n.rank, n.entry - r.off AS dpos FROM n JOIN range(0, ?) r(off) ON TRUE WHERE n.entry - r.off >= 0),
    c AS (SELECT o.rank, string_agg(coalesce(v.token, '?'), '' ORDER BY o.dpos) AS context
          FROM o JOIN datastore_tokens d ON d.pos = o.dpos
          LEFT JOIN vocab v ON v.token_id = d.token_id GROUP BY o.rank)
    SELECT n.rank, n.entry, n.token_id, v.token, n.distance_pq, n.distance_exact, n.overlap,
           n.overlap >= ? AS copy, c.context
    FROM n LEFT JOIN vocab v USING (token_id) LEFT JOIN c USING (rank) ORDER BY n.rank
    """
    return _df(cur, sql, [int(pos), int(width), infgram.COPY_MIN_OVERLAP])


def neighbor_context_tokens(cur: duckdb.DuckDBPyConnection, pos: int, width: int) -> pd.DataFrame:
    """Per stored neighbour of `pos` (rank, overlap): its entry's left context as a list of decoded
    tokens (`tokens`, datastore_tokens entry - width + 1 .. entry, oldest first), for the overlap highlight."""
    sql = """
    WITH n AS (SELECT rank, entry, overlap FROM neighbors WHERE pos = ?),
    o AS (SELECT n.rank, n.entry - r.off AS dpos FROM n JOIN range(0, ?) r(off) ON TRUE WHERE n.entry - r.off >= 0)
    SELECT n.rank, n.overlap, list(coalesce(v.token, '?') ORDER BY o.dpos) AS tokens
    FROM n JOIN o USING (rank) JOIN datastore_tokens d ON d.pos = o.dpos
    LEFT JOIN vocab v ON v.token_id = d.token_id GROUP BY n.rank, n.overlap ORDER BY n.rank
    """
    return _df(cur, sql, [int(pos), int(width)])
