"""All dashboard caching (STYLE §5): one read-only DuckDB connection per run file
(st.cache_resource; each script run takes `.cursor()`), query results via st.cache_data
keyed by plain values (db path, file mtime, function name, arguments).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import streamlit as st

from knnlm_core import neighbours as neighbours_mod
from knnlm_core import store, whatif
from knnlm_core.read import REGISTRY
from ui.params import runs_root

BLOCK = f"{neighbours_mod.ROOT}/eval-plain"  # the block the What-if re-scores, relative to the run directory


def db_path(run: str) -> Path:
    """metrics.duckdb of a run name under the runs root."""
    return runs_root() / run / store.DB_NAME


def run_key(run: str) -> tuple[str, int]:
    """(db path, mtime_ns): the cache key of a run file (a rebuilt run gets a new key)."""
    path = db_path(run)
    if not path.is_file():
        raise store.RunSchemaError(f"run '{run}' has no {store.DB_NAME} under {runs_root()}")
    return str(path), path.stat().st_mtime_ns


@st.cache_resource(max_entries=8, show_spinner=False)
def _connection(path: str, mtime_ns: int) -> duckdb.DuckDBPyConnection:
    """Shared read-only root connection of one run file (raises RunSchemaError)."""
    return store.open_readonly(Path(path))


def cursor(run: str) -> duckdb.DuckDBPyConnection:
    """A fresh cursor on the run's shared read-only connection."""
    return _connection(*run_key(run)).cursor()


@st.cache_data(max_entries=512, show_spinner=False)
def _query(path: str, mtime_ns: int, name: str, args: tuple, kwargs: tuple):
    """Cached result of the knnlm_core.read function `name` (read.REGISTRY) on (cursor, *args, **kwargs)."""
    fn = REGISTRY[name]
    return fn(_connection(path, mtime_ns).cursor(), *args, **dict(kwargs))


def q(run: str, name: str, *args, **kwargs):
    """Run a knnlm_core.read query (by name) on a run, cached by plain values."""
    norm = tuple(tuple(a) if isinstance(a, list) else a for a in args)
    kw = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
    return _query(*run_key(run), name, norm, kw)


def run_info(run: str) -> dict:
    """The run row (cached)."""
    return q(run, "run_info")


@st.cache_resource(max_entries=2, show_spinner="Loading stored neighbours…")
def _neighbours(path: str, mtime_ns: int, block_mtime_ns: int) -> whatif.StoredNeighbours:
    """Per-position neighbour arrays of a run: all k from its neighbour block when present (block_mtime_ns > 0;
    memory-mapped), else the `neighbors` table (shared: never mutate the arrays)."""
    cur = _connection(path, mtime_ns).cursor()
    if block_mtime_ns:
        return whatif.load_block(neighbours_mod.open_block(Path(path).parent / BLOCK), cur)
    return whatif.load_neighbours(cur)


def neighbours(run: str) -> whatif.StoredNeighbours:
    """Stored neighbour arrays of a run (cached as a resource: no copy per rerun); ValueError when its
    neighbour block is damaged or does not match the run."""
    return _neighbours(*run_key(run), _block_mtime(run))


@st.cache_data(max_entries=32, show_spinner="Re-scoring…")
def _rescored(path: str, mtime_ns: int, block_mtime_ns: int, k: int, tau: float, source: str,
              use_idf: bool) -> np.ndarray:
    """p_kNN(target) (T,) recomputed from the stored neighbours."""
    data = _neighbours(path, mtime_ns, block_mtime_ns)
    n_entries = int(_connection(path, mtime_ns).cursor().execute("SELECT n_entries FROM run").fetchone()[0])
    weights = whatif.idf(data.type_freq, n_entries) if use_idf else None
    return whatif.rescore(data, k, tau, source, weights)


def rescored(run: str, k: int, tau: float, source: str, use_idf: bool = False) -> np.ndarray:
    """Cached what-if p_kNN of a run for (k, tau, source, idf)."""
    return _rescored(*run_key(run), _block_mtime(run), int(k), float(tau), str(source), bool(use_idf))


def clear() -> None:
    """Drop every cached value and connection (tests, or after rebuilding runs)."""
    st.cache_data.clear()
    st.cache_resource.clear()


@st.cache_resource(max_entries=4, show_spinner=False)
def _light_tokenizer(path: str):
    from knnlm_core.corpus import light_tokenizer

    try:
        return light_tokenizer(path)
    except Exception:  # a damaged tokenizer file: the explorer then says it cannot tokenize
        return None


def tokenizer(info: dict):
    """The run's tokenizer without transformers (None when it is not a local directory)."""
    from knnlm_core.config import resolve_path

    cfg = info.get("config") or {}
    return _light_tokenizer(str(resolve_path(cfg.get("tokenizer") or cfg.get("model") or "")))


def has_block(run: str) -> bool:
    """Whether the run directory holds its (eval, plain) neighbour block (shipped runs keep only the database)."""
    return _block_mtime(run) > 0


def _block_mtime(run: str) -> int:
    """mtime_ns of the run's block listing, 0 when there is none (part of the neighbour cache key)."""
    path = db_path(run).parent / BLOCK / neighbours_mod.LISTING
    return path.stat().st_mtime_ns if path.is_file() else 0


# ---------------------------------------------------------------- the Probe (SPEC §13): one loaded run per process

@st.cache_resource(max_entries=2, show_spinner="Loading the run's model, index and datastore (once per server)…")
def _probe(run_dir: str, manifest_mtime_ns: int):
    """The run's precompute.probe.Probe (model, tokenizer, index, keys, suffix array), shared by every session:
    it is read-only and serialises its model and index calls itself. Imports torch only when called."""
    from precompute import probe

    return probe.load(run_dir)


def probe(run: str):
    """The loaded Probe of a run (ProbeError / ModelError / RunError when it cannot be loaded)."""
    run_dir = db_path(run).parent
    manifest = run_dir / "manifest.json"
    return _probe(str(run_dir), manifest.stat().st_mtime_ns if manifest.is_file() else 0)
