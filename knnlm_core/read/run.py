"""Run metadata and the dashboard's filters (SPEC §6, §7), with the helpers every read-side feature shares.

Every query of knnlm_core.read takes a DuckDB cursor plus plain values and returns a pandas DataFrame (or a small
dict). User values are always bound as SQL parameters; column names used for sorting come from a whitelist.
Aggregation happens in SQL: no function loads a whole per-position table into pandas. No streamlit, no torch.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd

from knnlm_core.bins import bin_labels
from knnlm_core.store import HIT_KS

OUTCOMES = ("all", "helped", "harmed")  # helped: gain > 0, harmed: gain < 0


def _df(cur: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> pd.DataFrame:
    """Run parameterized SQL and return a DataFrame."""
    return cur.execute(sql, params or []).df()


def add_bin_label(df: pd.DataFrame) -> pd.DataFrame:
    """Insert a `bin` label column (knnlm_core.bins) right after `freq_bin`."""
    df = df.copy()
    df.insert(df.columns.get_loc("freq_bin") + 1, "bin", bin_labels(df["freq_bin"].to_numpy()))
    return df


def hit_ks_for(run_k: int) -> tuple[int, ...]:
    """The hit@k cut-offs defined for a run (those <= its k)."""
    return tuple(k for k in HIT_KS if k <= run_k)


# --------------------------------------------------------------------------- run metadata


def run_info(cur: duckdb.DuckDBPyConnection) -> dict:
    """The single `run` row as a dict, with `config` parsed from `config_json`."""
    row = _df(cur, "SELECT * FROM run LIMIT 1")
    if row.empty:
        return {}
    info = {k: (None if pd.isna(v) else v) for k, v in row.iloc[0].to_dict().items()}
    try:
        info["config"] = json.loads(info.get("config_json") or "{}")
    except json.JSONDecodeError:
        info["config"] = {}
    for key in ("k", "n_eval", "n_entries", "nprobe", "store_neighbors", "dim"):
        if info.get(key) is not None:
            info[key] = int(info[key])
    return info


def bin_list(cur: duckdb.DuckDBPyConnection) -> list[int]:
    """Frequency bins that occur among evaluation targets, ascending."""
    return [int(b) for b in _df(cur, "SELECT DISTINCT freq_bin FROM eval_tokens ORDER BY 1")["freq_bin"]]


def doc_ids(cur: duckdb.DuckDBPyConnection) -> np.ndarray:
    """(T,) int32 document of every evaluation position (SPEC §11), in position order."""
    return _df(cur, "SELECT doc_id FROM eval_tokens ORDER BY pos")["doc_id"].to_numpy(np.int32)


# --------------------------------------------------------------------------- filters


def eval_filter(
    bin_lo: int | None = None,
    bin_hi: int | None = None,
    token_ids: list[int] | None = None,
    outcome: str = "all",
    alias: str = "",
) -> tuple[str, list]:
    """WHERE clause (without WHERE) and params over eval_tokens for the dashboard filters."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}")
    a = f"{alias}." if alias else ""
    clauses, params = ["TRUE"], []
    if bin_lo is not None:
        clauses.append(f"{a}freq_bin >= ?")
        params.append(int(bin_lo))
    if bin_hi is not None:
        clauses.append(f"{a}freq_bin <= ?")
        params.append(int(bin_hi))
    if token_ids:
        clauses.append(f"{a}token_id = ANY(?)")
        params.append([int(t) for t in token_ids])
    if outcome == "helped":
        clauses.append(f"{a}gain > 0")
    elif outcome == "harmed":
        clauses.append(f"{a}gain < 0")
    return " AND ".join(clauses), params
