"""What-if re-scoring of a run (SPEC §2, §9): exact where the run's data allow it.

- λ only: p_kNNLM = λ p_kNN + (1 − λ) p_LM with the run's own p_kNN (`eval_tokens.p_knn`,
  computed from run.k neighbours): exact for any λ, no neighbours needed.
- k, τ or distance source: p_kNN is re-scored from the stored neighbours: all run.k of them
  when the run directory holds the side file `neighbors_all.parquet` (ALL_NEIGHBOURS, written
  by `save_all_neighbours`), else the `neighbors` table (the first `store_neighbors` of the
  run.k the index returned, in rank order). Exact when all k requested neighbours are stored
  (k <= S: the index's top-k is the prefix of its top-run.k) and the data hold the requested
  distance source; otherwise re-scored from the S stored ones and labelled approximate, or
  labelled not available (`plan` decides; the page shows the run's own value beside).
- Mitigation experiments: the per-frequency-bin λ (an ORACLE, an upper bound: the target's
  bin is unknown at test time; `knnlm_core.adaptive`), and IDF-weighted p_kNN: neighbour j
  weighs exp(-d_j / τ) · idf(v_j), idf(v) = ln(1 + N / freq(v)), renormalised.

Re-scoring (`rescore`) equals the float64 softmax (`knn.p_knn_of`) to ~1e-13 relative without
an exp per neighbour: a group of GROUP neighbours contributes Σ_j exp(-(d_j - m) / τ) =
exp(-(centre - m) / τ) Σ_p (-1/τ)^p / p! Σ_j (d_j - centre)^p, a truncated power series in the
group's τ-independent moments (built on the first call per data, source and weights, cached on
the data: 2 bytes per neighbour); groups too wide for the series at this τ are summed directly,
groups more than SKIP τ above the row's smallest distance are dropped (< e^-50 each), and the
numerator sums the few target neighbours directly. Numpy only (the app imports this module);
blocks of rows run on threads (numpy releases the GIL).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import adaptive, bootstrap, intervals, knn
from knnlm_core.bins import bin_labels

ROWS = 256  # positions per re-scoring block
SOURCES = ("pq", "exact")
ALL_NEIGHBOURS = "neighbors_all.parquet"  # side file of all run.k neighbours, next to metrics.duckdb
GROUP = 64  # neighbours per moment group
MOMENTS = 13  # moments Σ a (d - centre)^p, p = 0..12, kept per group
RHO = 0.5  # series used when half a group's distance span / τ <= RHO: truncation <= RHO^13 e^(2 RHO) / 13! = 5e-14
SKIP = 50.0  # groups whose smallest distance exceeds the row's by SKIP τ weigh < e^-50 each: dropped
KEEP_SUMMARIES = 2  # summaries (source, weights) kept per loaded data
DENSE = 0.8  # a block sums all its columns directly when the direct groups hold more than this share of them
LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class StoredNeighbours:
    """Per-position arrays of a run (T = evaluation positions, S = stored neighbours).

    Missing neighbours have value -1 and distance +inf; a distance unknown for one source is +inf there.
    """

    nbr_values: np.ndarray  # (T, S) int32 value token of each neighbour, -1 = none stored
    dists_pq: np.ndarray  # (T, S) float32 PQ (index) squared L2 distances, inf = missing
    dists_exact: np.ndarray  # (T, S) float32 exact squared L2 distances, inf = missing
    targets: np.ndarray  # (T,) int32 target token ids
    p_lm: np.ndarray  # (T,) float64
    p_knn_run: np.ndarray  # (T,) float64 the run's own p_kNN (run.k neighbours)
    freq_bin: np.ndarray  # (T,) int16
    type_freq: np.ndarray  # (V,) int64 datastore frequency of every token id (0 = unseen)
    match: np.ndarray  # (T, S) bool neighbour present and its value is the target
    sources: tuple[str, ...] = SOURCES  # distance sources the arrays hold (no "exact": none stored)
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # rescore's τ-independent summaries

    @property
    def n_stored(self) -> int:
        """S: neighbours stored per position."""
        return int(self.nbr_values.shape[1])


def from_arrays(
    nbr_values: np.ndarray,
    dists_pq: np.ndarray,
    dists_exact: np.ndarray,
    targets: np.ndarray,
    p_lm: np.ndarray,
    p_knn_run: np.ndarray,
    freq_bin: np.ndarray,
    type_freq: np.ndarray,
    sources: tuple[str, ...] = SOURCES,
) -> StoredNeighbours:
    """StoredNeighbours with missing neighbours normalised (value -1, distances inf) and the
    target-match mask computed once (everything τ-independent is done here, not per re-score)."""
    t, s = nbr_values.shape
    assert dists_pq.shape == dists_exact.shape == (t, s) and targets.shape == p_lm.shape == (t,)
    assert set(sources) <= set(SOURCES)
    values = np.asarray(nbr_values, dtype=np.int32)
    present = values != knn.PAD  # a neighbour whose distance of one source is unknown weighs 0 under that source
    dq, de = (_with_inf(d, present) for d in (dists_pq, dists_exact))
    targets = np.asarray(targets, dtype=np.int32)
    return StoredNeighbours(
        nbr_values=values, dists_pq=dq, dists_exact=de, targets=targets,
        p_lm=np.asarray(p_lm, dtype=np.float64), p_knn_run=np.asarray(p_knn_run, dtype=np.float64),
        freq_bin=np.asarray(freq_bin, dtype=np.int16), type_freq=np.asarray(type_freq, dtype=np.int64),
        match=present & (values == targets[:, None]), sources=tuple(sources),
    )


def _with_inf(d: np.ndarray, present: np.ndarray) -> np.ndarray:
    """float32 distances (T, S) with +inf where the neighbour is absent or its distance unknown
    (no copy when nothing is missing)."""
    d = np.asarray(d, dtype=np.float32)
    ok = present & np.isfinite(d)
    return d if ok.all() else np.where(ok, d, np.inf).astype(np.float32)


def load_neighbours(cur: duckdb.DuckDBPyConnection) -> StoredNeighbours:
    """Read the stored neighbours (`neighbors` table) and evaluation arrays of a run (one pass over each table)."""
    t = int(cur.execute("SELECT count(*) FROM eval_tokens").fetchone()[0])
    s, n_rows, n_exact = (int(v) for v in cur.execute(
        "SELECT coalesce(max(rank), 0), count(*), count(distance_exact) FROM neighbors").fetchone())
    if n_rows == t * s:
        # Complete table: the pipeline writes it ORDER BY pos, rank and DuckDB preserves insertion
        # order, so the three value columns reshape to (T, S) without reading pos / rank.
        nb = cur.execute("SELECT token_id, distance_pq, coalesce(distance_exact, 'inf'::REAL) AS distance_exact "
                         "FROM neighbors").fetchnumpy()
        nbr_values, dists_pq, dists_exact = (
            np.asarray(nb[c], dtype=d).reshape(t, s)
            for c, d in (("token_id", np.int32), ("distance_pq", np.float32), ("distance_exact", np.float32))
        )
    else:
        nb = cur.execute("SELECT pos, rank, token_id, distance_pq, coalesce(distance_exact, 'inf'::REAL) "
                         "AS distance_exact FROM neighbors").fetchnumpy()
        nbr_values, dists_pq, dists_exact = _to_grid(nb, t, s)
    return _with_positions(cur, nbr_values, dists_pq, dists_exact, _sources(n_rows, n_exact))


def _sources(n_rows: int, n_exact: int) -> tuple[str, ...]:
    """Distance sources held by neighbour rows: "exact" only when some exact distance is stored."""
    return SOURCES if n_exact > 0 or n_rows == 0 else ("pq",)


def _with_positions(cur: duckdb.DuckDBPyConnection, nbr_values: np.ndarray, dists_pq: np.ndarray,
                    dists_exact: np.ndarray, sources: tuple[str, ...]) -> StoredNeighbours:
    """StoredNeighbours from (T, S) neighbour arrays plus the run's targets, p_LM, p_kNN, bins and type
    frequencies (eval_tokens in pos order, token_types)."""
    ev = cur.execute("SELECT token_id, p_lm, p_knn, freq_bin FROM eval_tokens ORDER BY pos").fetchnumpy()
    tf = cur.execute("SELECT token_id, freq FROM token_types").fetchnumpy()
    vocab_size = int(max(tf["token_id"].max(initial=0), nbr_values.max(initial=0), ev["token_id"].max(initial=0))) + 1
    type_freq = np.zeros(vocab_size, dtype=np.int64)  # (V,)
    type_freq[np.asarray(tf["token_id"], dtype=np.int64)] = np.asarray(tf["freq"], dtype=np.int64)
    return from_arrays(
        nbr_values, dists_pq, dists_exact, np.asarray(ev["token_id"]), np.asarray(ev["p_lm"]),
        np.asarray(ev["p_knn"]), np.asarray(ev["freq_bin"]), type_freq, sources,
    )


def _to_grid(nb: dict, t: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, S) value / pq / exact arrays from neighbour rows; missing (pos, rank) = PAD / inf.

    Fast path: rows complete and in (pos, rank) order (how the run writes them) are reshaped.
    """
    pos, rank = np.asarray(nb["pos"]), np.asarray(nb["rank"])
    cols = ("token_id", "distance_pq", "distance_exact")
    dtypes = (np.int32, np.float32, np.float32)
    if (
        len(pos) == t * s
        and np.array_equal(rank, np.tile(np.arange(1, s + 1), t))
        and np.array_equal(pos, np.repeat(np.arange(t), s))
    ):
        return tuple(np.asarray(nb[c], dtype=d).reshape(t, s) for c, d in zip(cols, dtypes, strict=True))
    rows, ranks = pos.astype(np.int64), rank.astype(np.int64) - 1
    out = (np.full((t, s), knn.PAD, np.int32), np.full((t, s), np.inf, np.float32), np.full((t, s), np.inf, np.float32))
    for arr, c in zip(out, cols, strict=True):
        arr[rows, ranks] = np.asarray(nb[c], dtype=arr.dtype)
    return out


def save_all_neighbours(path: str | Path, nbr_values: np.ndarray, dists_pq: np.ndarray,
                        dists_exact: np.ndarray | None) -> None:
    """Write all k neighbours of every position, (T, k) arrays (value int32, -1 = missing; squared L2
    distances float32; exact distances or None), as Parquet: one row per (pos, rank), rank 1-based,
    ordered by pos, rank, ZSTD; dist_exact NULL when not given. Written to a temporary file in the same
    folder and renamed into place, so `path` is never a partial file."""
    path = Path(path)
    values = np.ascontiguousarray(nbr_values, dtype=np.int32)
    t, k = values.shape
    assert dists_pq.shape == (t, k) and (dists_exact is None or dists_exact.shape == (t, k))
    frame = {  # noqa: F841 (read by DuckDB's replacement scan); numpy columns in (pos, rank) order
        "pos": np.repeat(np.arange(t, dtype=np.int32), k),  # (T k,)
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int16), t),  # (T k,)
        "value": values.reshape(-1),
        "dist_pq": np.ascontiguousarray(dists_pq, dtype=np.float32).reshape(-1),
    }
    exact = "CAST(NULL AS FLOAT)"
    if dists_exact is not None:
        frame["dist_exact"] = np.ascontiguousarray(dists_exact, dtype=np.float32).reshape(-1)
        exact = "dist_exact"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    con = duckdb.connect()
    try:
        con.execute("SET preserve_insertion_order = true")  # the COPY keeps the frame's (pos, rank) order
        con.register("frame", frame)
        target = str(tmp).replace("'", "''")
        con.execute(f"COPY (SELECT pos, rank, value, dist_pq, {exact} AS dist_exact FROM frame) "
                    f"TO '{target}' (FORMAT parquet, COMPRESSION zstd)")
        os.replace(tmp, path)
    finally:
        con.close()
        tmp.unlink(missing_ok=True)


def load_all_neighbours(path: str | Path, cur: duckdb.DuckDBPyConnection) -> StoredNeighbours:
    """StoredNeighbours from the side file `path` (see save_all_neighbours) plus the run's per-position
    columns from `cur`; unknown exact distances become +inf. ValueError when the file does not hold
    T x k rows for the run's T positions."""
    src = str(path)
    t = int(cur.execute("SELECT count(*) FROM eval_tokens").fetchone()[0])
    n_rows, s, n_exact = (int(v) for v in cur.execute(
        "SELECT count(*), coalesce(max(rank), 0), count(dist_exact) FROM read_parquet(?)", [src]).fetchone())
    if n_rows != t * s or s == 0:
        raise ValueError(f"{Path(src).name} has {n_rows:,} rows and k = {s} (largest rank), but the run has {t:,} "
                         f"positions: expected T x k = {t * s:,} rows")
    cols = "value AS token_id, dist_pq AS distance_pq, coalesce(dist_exact, 'inf'::FLOAT) AS distance_exact"
    unordered = int(cur.execute(
        "SELECT count(*) FROM read_parquet(?, file_row_number = true) "
        "WHERE pos::BIGINT * ? + rank - 1 <> file_row_number", [src, s]).fetchone()[0])
    if unordered == 0:  # the writer's (pos, rank) order: reshape the file's rows (DuckDB keeps scan order)
        nb = cur.execute(f"SELECT {cols} FROM read_parquet(?)", [src]).fetchnumpy()
        grids = tuple(np.asarray(nb[c], dtype=d).reshape(t, s) for c, d in
                      (("token_id", np.int32), ("distance_pq", np.float32), ("distance_exact", np.float32)))
    else:
        grids = _to_grid(cur.execute(f"SELECT pos, rank, {cols} FROM read_parquet(?)", [src]).fetchnumpy(), t, s)
    return _with_positions(cur, *grids, _sources(n_rows, n_exact))


@dataclass(frozen=True)
class RunSettings:
    """The retrieval settings the run's own p_kNN was computed with."""

    k: int  # neighbours the index returned per position
    tau: float  # temperature τ
    source: str  # distance source: "pq" or "exact"
    lam: float  # the run's single λ
    n_stored: int  # neighbours stored per position (store_neighbors, or run.k with the side file)
    sources: tuple[str, ...] = SOURCES  # distance sources the stored neighbours hold


@dataclass(frozen=True)
class Plan:
    """How a What-if p_kNN for (k, τ, source) is obtained from a run."""

    k: int  # requested k
    k_used: int  # neighbours actually re-scored (0 = the run's own p_kNN is used)
    runs_own: bool  # (k, τ, source) are the run's: p_kNN is eval_tokens.p_knn itself
    exact: bool  # the result is the exact kNN-LM p_kNN at (k, τ, source)
    label: str  # what the page shows next to the numbers


def run_settings(info: dict, n_stored: int, sources: tuple[str, ...] = SOURCES) -> RunSettings:
    """RunSettings from the run row (dict of the `run` table) and what the stored neighbours hold."""
    return RunSettings(
        int(info["k"]), float(info["temperature"]), str(info["distance_source"]), float(info["lambda"]),
        int(n_stored), tuple(sources),
    )


def plan(k: int, tau: float, source: str, run: RunSettings) -> Plan:
    """Decide how p_kNN at (k, τ, source) is computed and whether it is exact."""
    if not 1 <= k <= run.k:
        raise ValueError(f"k must be in 1..{run.k} (neighbours the run's index returned per position)")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    if k == run.k and source == run.source and math.isclose(tau, run.tau, rel_tol=1e-12, abs_tol=1e-12):
        return Plan(k, 0, True, True, f"exact: the run's own p_kNN (k = {k}, τ = {run.tau:g}, {source} distances)")
    if run.n_stored == 0:
        return Plan(k, 0, False, False, "not available: the run stores no neighbours, so only λ can change")
    if source not in run.sources:
        return Plan(
            k, 0, False, False,
            f"not available: the stored neighbours have no {source} distances, so p_kNN cannot be re-scored "
            f"with them; the numbers are the run's own p_kNN (k = {run.k}, τ = {run.tau:g}, {run.source} distances)",
        )
    if k <= run.n_stored:
        return Plan(k, k, False, True, f"exact: re-scored from all {k} neighbours, stored for every position")
    return Plan(
        k, run.n_stored, False, False,
        f"approximate: k = {k} needs {k} neighbours per position but the run stores only {run.n_stored}; "
        f"re-scored from those {run.n_stored} (the softmax is normalised over fewer neighbours)",
    )


def idf(type_freq: np.ndarray, n_entries: int) -> np.ndarray:
    """idf(v) = ln(1 + N / freq(v)) per token id (V,); 0 for tokens absent from the datastore."""
    f = type_freq.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(f > 0, np.log1p(n_entries / np.maximum(f, 1.0)), 0.0)


def rescore(
    data: StoredNeighbours,
    k: int,
    tau: float,
    source: str = "pq",
    idf_weights: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """p_kNN(target) (T,) float64 from the first k stored neighbours, temperature tau, `pq` or
    `exact` distances; with `idf_weights` (V,) each neighbour's weight is multiplied by idf(value).

    Per row: Σ_{match} w_j / Σ_j w_j with w_j = exp(-(d_j - m) / tau), m = the row's smallest distance
    among the k: the float64 softmax of knn.p_knn_of to ~1e-13 relative. The first call per (data,
    source, weights) builds the group summary (cached on `data`: 2 bytes per neighbour, 10 per target
    neighbour); blocks of ROWS positions run on `threads` threads (default: all CPUs, at most 8).
    """
    if not 1 <= k <= data.n_stored:
        raise ValueError(f"k must be in 1..{data.n_stored} (neighbours stored per position)")
    if source not in data.sources:
        raise ValueError(f"source must be one of {data.sources} (distances the stored neighbours hold)")
    if not tau > 0:
        raise ValueError("tau must be > 0")
    weights = None if idf_weights is None else np.asarray(idf_weights, dtype=np.float64)
    n = _n_threads(len(data.targets), threads)
    summary = _summary(data, source, weights, n)
    call = _Call(data.dists_pq if source == "pq" else data.dists_exact, data.nbr_values, summary, k, 1.0 / tau,
                 _taylor(1.0 / tau), weights, None if weights is None else weights[data.targets])
    out = np.zeros(len(data.targets))  # (T,)

    def block(lo: int, hi: int) -> None:
        out[lo:hi] = call.rows(lo, hi)

    _for_blocks(len(out), n, block)
    return out


def _taylor(c: float) -> np.ndarray:
    """(MOMENTS,) coefficients (-c)^p / p! of exp(-c x) = Σ_p (-c)^p / p! x^p (inf where they overflow)."""
    p = np.arange(MOMENTS)
    with np.errstate(over="ignore"):
        return (-1.0) ** p * np.exp(p * math.log(c) - np.array([math.lgamma(i + 1) for i in p]))


def _n_threads(t: int, threads: int | None) -> int:
    """Threads for t rows: `threads`, default all CPUs (at most 8), never more than blocks of ROWS."""
    return max(1, min(threads or min(os.cpu_count() or 1, 8), -(-t // ROWS)))


def _for_blocks(t: int, n: int, fn, rows: int | None = None) -> None:
    """Call fn(lo, hi) on every block of `rows` (default ROWS) rows of [0, t), n threads each taking a
    contiguous span."""
    rows = rows or ROWS
    spans = [(i * t // n, (i + 1) * t // n) for i in range(n)]

    def work(span: tuple[int, int]) -> None:
        for lo in range(span[0], span[1], rows):
            fn(lo, min(lo + rows, span[1]))

    if n == 1:
        work(spans[0])
    else:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(work, spans))


@dataclass(frozen=True)
class _Targets:
    """The target neighbours (data.match) of every row as a CSR in row-major order."""

    start: np.ndarray  # (T + 1,) int64 row r's target neighbours are entries [start[r], start[r + 1])
    rows: np.ndarray  # (M,) int32 row of each target neighbour
    cols: np.ndarray  # (M,) int16 (int32 when S >= 2^15) column (0-based rank) of each target neighbour


@dataclass(frozen=True)
class _Summary:
    """τ-independent summary of one distance source (and neighbour weights) of every row: groups of
    GROUP consecutive neighbours (n = S // GROUP full groups; the S % GROUP last columns are always
    summed directly) and the distances of the target neighbours."""

    low: np.ndarray  # (T, n) float64 smallest finite distance of the group, inf = empty group
    centre: np.ndarray  # (T, n) float64 (smallest + largest) / 2, 0 for an empty group
    half: np.ndarray  # (T, n) float64 (largest - smallest) / 2, 0 for an empty group
    moments: np.ndarray  # (T, n, MOMENTS) float64 Σ_j a_j (d_j - centre)^p over the group's finite
    #                      distances, a_j = 1 or the neighbour's weight
    skip: float  # drop a group when its low exceeds the row's smallest distance by skip τ
    targets: _Targets
    target_d: np.ndarray  # (M,) float32 distance of each target neighbour, inf = unknown


_LOCK = threading.Lock()  # one builder of a data's cached summaries at a time


def _summary(data: StoredNeighbours, source: str, weights: np.ndarray | None, threads: int) -> _Summary:
    """The cached summary of (source, weights) on `data`, built on first use (at most KEEP_SUMMARIES
    kept per data, least recently used dropped first)."""
    key = ("summary", source, None if weights is None else hashlib.blake2b(weights.tobytes()).hexdigest())
    with _LOCK:
        if key in data.cache:
            data.cache[key] = data.cache.pop(key)  # most recently used last
            return data.cache[key]
        if "targets" not in data.cache:
            data.cache["targets"] = _build_targets(data.match)
        old = [k for k in data.cache if k[0] == "summary"]
        for k in old[: max(0, len(old) - KEEP_SUMMARIES + 1)]:
            del data.cache[k]
        data.cache[key] = _build_summary(data, source, weights, threads, data.cache["targets"])
        return data.cache[key]


def _build_targets(match: np.ndarray) -> _Targets:
    """CSR of a (T, S) bool mask."""
    t, s = match.shape
    flat = np.flatnonzero(match)  # (M,) int64 row-major
    rows = (flat // s).astype(np.int32)
    start = np.zeros(t + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=t), out=start[1:])
    return _Targets(start, rows, (flat % s).astype(np.int16 if s < 2**15 else np.int32))


def _build_summary(data: StoredNeighbours, source: str, weights: np.ndarray | None, threads: int,
                   targets: _Targets) -> _Summary:
    """Group low / centre / half / moments of every row (blocks of GROUP rows on threads) and the
    distances of its target neighbours."""
    dists = data.dists_pq if source == "pq" else data.dists_exact  # (T, S) float32, inf = missing
    t, s = dists.shape
    n = s // GROUP
    low, centre, half = (np.zeros((t, n)) for _ in range(3))  # (T, n) each
    moments = np.zeros((t, n, MOMENTS))  # (T, n, MOMENTS)
    extremes = []  # (smallest, largest) weight of the present neighbours of each block (weighted only)

    def block(lo: int, hi: int) -> None:
        r = hi - lo
        d = dists[lo:hi, : n * GROUP].reshape(r, n, GROUP)  # (r, n, GROUP) float32
        ok = d < np.inf
        low[lo:hi] = a = d.min(axis=2)  # (r, n) float32, inf = empty group
        b = d.max(axis=2)  # (r, n) float32, inf where some neighbour of the group is missing
        part = (b == np.inf) & (a < np.inf)
        b[part] = np.where(ok[part], d[part], -np.inf).max(axis=1)
        a, b = np.where(a < np.inf, a, 0.0), np.where(a < np.inf, b, 0.0)
        centre[lo:hi] = (a.astype(np.float64) + b) / 2  # exact in float64
        half[lo:hi] = (b.astype(np.float64) - a) / 2
        x = np.subtract(d, centre[lo:hi, :, None], dtype=np.float64)  # (r, n, GROUP) exact differences
        if weights is None:
            y = ok.astype(np.float64)
        else:
            v = data.nbr_values[lo:hi]
            w = weights[np.maximum(v, 0)]  # (r, S)
            extremes.append((np.where(v >= 0, w, np.inf).min(), np.where(v >= 0, w, 0.0).max()))
            y = np.where(ok, w[:, : n * GROUP].reshape(r, n, GROUP), 0.0)
        if not ok.all():
            x[~ok] = 0.0  # (inf otherwise; y is 0 there)
        for p in range(MOMENTS):
            moments[lo:hi, :, p] = np.einsum("rng->rn", y)  # numpy's own loop: no BLAS threads under ours
            if p + 1 < MOMENTS:
                y *= x

    _for_blocks(t, threads, block, rows=GROUP)
    target_d = dists.reshape(-1)[targets.rows.astype(np.int64) * s + targets.cols]  # (M,) float32
    return _Summary(low, centre, half, moments, SKIP + _log_spread(extremes), targets, target_d)


def _log_spread(extremes: list[tuple[float, float]]) -> float:
    """ln(largest / smallest weight) of the present neighbours (0 unweighted; inf when one weighs 0:
    no group is then dropped)."""
    if not extremes:
        return 0.0
    lo, hi = min(e[0] for e in extremes), max(e[1] for e in extremes)
    return 0.0 if hi <= 0 or lo == np.inf else math.inf if lo <= 0 else math.log(hi / lo)


@dataclass(frozen=True)
class _Call:
    """One re-scoring request (k, c = 1/τ, weights): the constants its row blocks share."""

    dists: np.ndarray  # (T, S) float32 distances of the requested source, inf = missing
    values: np.ndarray  # (T, S) int32 neighbour values, -1 = missing
    summary: _Summary
    k: int  # neighbours per row re-scored (the first k)
    c: float  # 1 / τ
    coef: np.ndarray  # (MOMENTS,) float64 Taylor coefficients of exp(-c x)
    weights: np.ndarray | None  # (V,) float64 neighbour weight per value, None = unweighted
    target_w: np.ndarray | None  # (T,) float64 weight of each row's target (= of its target neighbours)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """p_kNN(target) (hi - lo,) of rows [lo, hi): target weight sum / weight sum, both shifted by the
        row's smallest distance among the first k (largest unweighted weight = 1)."""
        q = min(self.k // GROUP, self.summary.low.shape[1])  # full groups inside the first k
        tail = slice(q * GROUP, self.k)  # columns past the last full group: summed directly
        shift = np.minimum(self.summary.low[lo:hi, :q].min(axis=1, initial=np.inf),
                           self.dists[lo:hi, tail].min(axis=1, initial=np.inf))  # (r,) float64
        shift[shift == np.inf] = 0.0  # a row without neighbours: every weight exp(-inf) = 0
        den = self._direct(self.dists[lo:hi, tail], self.values[lo:hi, tail], shift).sum(axis=1)
        if q:
            den += self._groups(lo, hi, q, shift)
        num = self._targets(lo, hi, shift)
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    def _groups(self, lo: int, hi: int, q: int, shift: np.ndarray) -> np.ndarray:
        """Weight sum (r,) of the first q groups: power series where c * half <= RHO, direct where not,
        nothing for groups more than summary.skip / c above the row's smallest distance."""
        sm, c = self.summary, self.c
        with np.errstate(invalid="ignore"):
            live = c * (sm.low[lo:hi, :q] - shift[:, None]) <= sm.skip  # (r, q); empty group: inf -> False
        series = live & (c * sm.half[lo:hi, :q] <= RHO)
        direct = live & ~series
        n_direct = np.count_nonzero(direct)
        used = np.flatnonzero(live.any(axis=0))
        end = (used[-1] + 1) * GROUP if len(used) else 0  # columns up to the block's last live group
        if n_direct * GROUP > DENSE * (hi - lo) * end:
            return self._direct(self.dists[lo:hi, :end], self.values[lo:hi, :end], shift).sum(axis=1)
        den = self._series(lo, hi, q, series, shift)
        return den + self._gathered(lo, hi, direct, shift) if n_direct else den

    def _series(self, lo: int, hi: int, q: int, series: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Σ over the `series` groups (r, q) of exp(-c (centre - shift)) Σ_p coef_p moment_p."""
        sm = self.summary
        with np.errstate(all="ignore"):  # groups outside `series` may overflow; they are not used
            s = np.einsum("rqm,m->rq", sm.moments[lo:hi, :q], self.coef)  # (r, q) Σ_j a_j exp(-c (d_j - centre))
            fac = np.exp(-self.c * (sm.centre[lo:hi, :q] - shift[:, None]))  # (r, q) <= 1
            return np.where(series, fac * s, 0.0).sum(axis=1)

    def _gathered(self, lo: int, hi: int, direct: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Direct weight sum (r,) over the groups marked in `direct` (r, q), gathered into one array."""
        rows, grp = np.nonzero(direct)
        cols = grp[:, None] * GROUP + np.arange(GROUP)  # (b, GROUP)
        w = self._direct(self.dists[lo + rows[:, None], cols], self.values[lo + rows[:, None], cols], shift[rows])
        return np.bincount(rows, w.sum(axis=1), minlength=hi - lo)

    def _direct(self, d: np.ndarray, v: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Weights (b, m) float64 a_j exp(-c (d_j - shift)) of distances d (b, m) float32 with values v."""
        w = np.subtract(d, shift[:, None], dtype=np.float64)  # missing: inf
        w *= -self.c * LOG2E
        np.exp2(w, out=w)  # exp2 is a little faster than exp in numpy without AVX-512
        if self.weights is not None:
            w *= self.weights[np.maximum(v, 0)]
        return w

    def _targets(self, lo: int, hi: int, shift: np.ndarray) -> np.ndarray:
        """Target weight sum (r,) over the target neighbours among the first k."""
        sm, tg = self.summary, self.summary.targets
        a, b = tg.start[lo], tg.start[hi]
        rows, d = tg.rows[a:b] - lo, sm.target_d[a:b]
        if self.k < self.dists.shape[1]:
            keep = tg.cols[a:b] < self.k
            rows, d = rows[keep], d[keep]
        w = np.subtract(d, shift[rows], dtype=np.float64)
        w *= -self.c * LOG2E
        num = np.bincount(rows, np.exp2(w, out=w), minlength=hi - lo).astype(np.float64)  # int64 when empty
        return num if self.target_w is None else num * self.target_w[lo:hi]


def p_knn_for(data: StoredNeighbours, p: Plan, tau: float, source: str) -> np.ndarray:
    """p_kNN (T,) following a Plan: the run's own column, or re-scored from p.k_used neighbours."""
    if p.runs_own or p.k_used == 0:
        return data.p_knn_run
    return rescore(data, p.k_used, tau, source)


def interpolate(data: StoredNeighbours, lam: float | np.ndarray, p_knn: np.ndarray | None = None) -> np.ndarray:
    """p_kNNLM (T,) = λ p_kNN + (1 − λ) p_LM; p_kNN defaults to the run's own (exact for any λ)."""
    return knn.interpolate(data.p_lm, data.p_knn_run if p_knn is None else p_knn, lam)


def choose_tau(
    valid: StoredNeighbours, taus: np.ndarray, lam: float, k: int | None = None, source: str = "pq"
) -> tuple[float, np.ndarray]:
    """(best τ, PPL per τ (G,)) on a VALIDATION split's stored neighbours: the grid value whose
    λ-interpolated PPL is lowest (SPEC §9: τ of a whitened datastore is chosen this way)."""
    k = valid.n_stored if k is None else k
    ppl = np.array([overall_ppl(interpolate(valid, lam, rescore(valid, k, float(t), source))) for t in taus])
    return float(np.asarray(taus)[int(np.argmin(ppl))]), ppl


def lam_per_position(freq_bin: np.ndarray, lam_by_bin: dict[int, float], default: float) -> np.ndarray:
    """λ of each position (T,) from a {bin: λ} map (bins absent from the map get `default`)."""
    lut_bins = np.array(sorted(lam_by_bin), dtype=np.int64)
    lam = np.full(freq_bin.shape, float(default))
    if len(lut_bins):
        idx = np.searchsorted(lut_bins, freq_bin)
        idx_c = np.minimum(idx, len(lut_bins) - 1)
        known = lut_bins[idx_c] == freq_bin
        lam[known] = np.array([lam_by_bin[int(b)] for b in lut_bins])[idx_c[known]]
    return lam


def ppl_by_bin(freq_bin: np.ndarray, p_lm: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """Per bin (ascending): n_tokens and exp(mean -ln p) of p_lm and of p (both (T,))."""
    bins, inv = np.unique(freq_bin, return_inverse=True)
    n = np.bincount(inv)
    with np.errstate(divide="ignore"):
        nll_lm = np.bincount(inv, weights=-np.log(p_lm)) / n
        nll = np.bincount(inv, weights=-np.log(p)) / n
    return pd.DataFrame(
        {"freq_bin": bins, "bin": bin_labels(bins), "n_tokens": n, "ppl_lm": np.exp(nll_lm), "ppl": np.exp(nll)}
    )


def scenario_table(run_bins: pd.DataFrame, data: StoredNeighbours, scenarios: dict[str, np.ndarray],
                   doc_id: np.ndarray, n_docs: int, run_lam: float) -> pd.DataFrame:
    """Per bin: the run's PPLs (from queries.bin_summary, with their intervals) and, for each scenario's
    p_kNNLM (T,), `ppl_<name>` and `change_<name>` (relative to the run's kNN-LM, paired) with SPEC §11
    intervals and the verdict `<name>_vs_run`."""
    keep = ["freq_bin", "bin", "n_tokens", "n_docs", "ppl_lm", "ppl_lm_ci_lo", "ppl_lm_ci_hi", "ppl_knnlm",
            "ppl_knnlm_ci_lo", "ppl_knnlm_ci_hi"]
    table = run_bins[[c for c in keep if c in run_bins]].rename(
        columns=lambda c: c.replace("ppl_knnlm", "ppl_knnlm_run"))
    with np.errstate(divide="ignore"):
        sums = {"nll_run": -np.log(knn.interpolate(data.p_lm, data.p_knn_run, run_lam)),
                **{f"nll_{i}": -np.log(p) for i, p in enumerate(scenarios.values())}}
    figs = []
    for i, name in enumerate(scenarios):
        figs += [bootstrap.ppl(f"ppl_{name}", f"nll_{i}"), bootstrap.ppl_change(f"change_{name}", f"nll_{i}", "nll_run")]
    ci = intervals.per_position_intervals(doc_id, data.freq_bin, n_docs, sums, figs)
    for name in scenarios:
        intervals.add_verdict(ci, f"change_{name}", f"{name}_vs_run", "lower", "higher")
    return table.merge(ci.drop(columns=["n_tokens", "n_docs", "ci_note"]), on="freq_bin", how="left")


def overall_ppl(p: np.ndarray) -> float:
    """exp(mean -ln p) over all positions."""
    with np.errstate(divide="ignore"):
        return float(np.exp(np.mean(-np.log(p))))


def best_lambda_per_bin(
    freq_bin: np.ndarray, p_lm: np.ndarray, p_knn: np.ndarray, grid: np.ndarray | None = None
) -> dict[int, float]:
    """ORACLE (upper bound) λ per frequency bin: the grid value (default 0, 0.01, …, 1) minimising
    the bin's mean NLL of λ p_kNN + (1-λ) p_LM on these very positions (adaptive.oracle_by_bin)."""
    return adaptive.oracle_by_bin(freq_bin, p_lm, p_knn, grid)
