"""What-if re-scoring of a run (SPEC §2, §9): exact where the run's data allow it.

- λ only: p_kNNLM = λ p_kNN + (1 − λ) p_LM with the run's own p_kNN (`eval_tokens.p_knn`,
  computed from run.k neighbours): exact for any λ, no neighbours needed.
- k, τ or distance source: p_kNN is re-scored from the stored neighbours: all run.k of them,
  with PQ and exact distances, when the run directory holds its (eval, plain) neighbour block
  (SPEC §7, `knnlm_core.neighbours`; read memory-mapped by row range, never loaded whole), else
  the `neighbors` table (the first `store_neighbors` of the run.k the index returned, in rank
  order: shipped runs keep only their database). Exact when all k requested neighbours are stored
  (k <= S: the index's top-k is the prefix of its top-run.k) and the data hold the requested
  distance source; otherwise re-scored from the S stored ones and labelled approximate, or
  labelled not available (`plan` decides; the page shows the run's own value beside).
- Baselines (`baseline_for`): a change is measured against the run itself only when the scenario's
  p_kNN stands for what it says (the run's own, or re-scored from all k requested neighbours). A
  scenario re-scored from fewer neighbours than its k (a shipped run: 16 of 1,024) is compared with
  the run's τ, source and λ re-scored from the SAME neighbours, so truncation never reads as a
  parameter effect; the run's own PPL is context only.
- Mitigation experiments: the per-frequency-bin λ (an ORACLE, an upper bound: the target's
  bin is unknown at test time; `knnlm_core.adaptive`), and IDF-weighted p_kNN: neighbour j
  weighs exp(-d_j / τ) · idf(v_j), idf(v) = ln(1 + N / freq(v)), renormalised.

Re-scoring (`rescore`) is `knnlm_core.rescore.p_knn`: the float64 softmax of `knn.p_knn_of`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import adaptive, bootstrap, knn, neighbours
from knnlm_core.bins import bin_labels
from knnlm_core.read import ci as intervals
from knnlm_core.rescore import p_knn

SOURCES = ("pq", "exact")


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
    sources: tuple[str, ...] = SOURCES  # distance sources the arrays hold (no "exact": none stored)
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # the match mask, once asked for

    @property
    def n_stored(self) -> int:
        """S: neighbours stored per position."""
        return int(self.nbr_values.shape[1])

    @property
    def match(self) -> np.ndarray:
        """(T, S) bool: neighbour present and its value is the target (computed on first use)."""
        if "match" not in self.cache:
            self.cache["match"] = np.asarray(self.nbr_values[:]) == self.targets[:, None]
        return self.cache["match"]


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
    """StoredNeighbours with missing neighbours normalised (value -1, distances inf)."""
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
        sources=tuple(sources),
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


def load_block(block: neighbours.Block, cur: duckdb.DuckDBPyConnection) -> StoredNeighbours:
    """StoredNeighbours over a run's (eval, plain) neighbour block (all k neighbours, PQ and exact distances),
    memory-mapped: columns are read by row range as the re-scoring walks them. ValueError when the block does
    not hold one row per evaluation position."""
    t = int(cur.execute("SELECT count(*) FROM eval_tokens").fetchone()[0])
    if block.n_rows != t:
        raise ValueError(f"neighbour block {block.folder} has {block.n_rows:,} rows but the run has {t:,} positions: "
                         "rebuild the run")
    ev, type_freq = _eval_arrays(cur, 0)
    return StoredNeighbours(
        nbr_values=block.column("values"), dists_pq=block.column("dist_pq"), dists_exact=block.column("dist_exact"),
        targets=np.asarray(ev["token_id"], dtype=np.int32), p_lm=np.asarray(ev["p_lm"], dtype=np.float64),
        p_knn_run=np.asarray(ev["p_knn"], dtype=np.float64), freq_bin=np.asarray(ev["freq_bin"], dtype=np.int16),
        type_freq=type_freq,
    )


def _eval_arrays(cur: duckdb.DuckDBPyConnection, max_value: int) -> tuple[dict, np.ndarray]:
    """(eval_tokens' token_id, p_lm, p_knn, freq_bin in pos order; datastore frequency (V,) of every token id up
    to the largest of the run's and `max_value`)."""
    ev = cur.execute("SELECT token_id, p_lm, p_knn, freq_bin FROM eval_tokens ORDER BY pos").fetchnumpy()
    tf = cur.execute("SELECT token_id, freq FROM token_types").fetchnumpy()
    vocab_size = int(max(tf["token_id"].max(initial=0), max_value, ev["token_id"].max(initial=0))) + 1
    type_freq = np.zeros(vocab_size, dtype=np.int64)  # (V,)
    type_freq[np.asarray(tf["token_id"], dtype=np.int64)] = np.asarray(tf["freq"], dtype=np.int64)
    return ev, type_freq


def _sources(n_rows: int, n_exact: int) -> tuple[str, ...]:
    """Distance sources held by neighbour rows: "exact" only when some exact distance is stored."""
    return SOURCES if n_exact > 0 or n_rows == 0 else ("pq",)


def _with_positions(cur: duckdb.DuckDBPyConnection, nbr_values: np.ndarray, dists_pq: np.ndarray,
                    dists_exact: np.ndarray, sources: tuple[str, ...]) -> StoredNeighbours:
    """StoredNeighbours from (T, S) neighbour arrays plus the run's targets, p_LM, p_kNN, bins and type
    frequencies (eval_tokens in pos order, token_types)."""
    ev, type_freq = _eval_arrays(cur, int(nbr_values.max(initial=0)))
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


RUN = "run"  # name of the run-itself baseline (`change_<scenario>` against the run's own kNN-LM)


@dataclass(frozen=True)
class Baseline:
    """What a scenario's PPL change is measured against."""

    name: str  # table suffix: RUN, or "run@S" for the run's settings re-scored from S stored neighbours
    k_used: int  # 0: the run's own p_kNN (all run.k neighbours); S > 0: re-scored from the first S stored
    label: str  # the headline's wording ("vs the run's settings re-scored from the same 16 neighbours")


def baseline_for(k: int, k_used: int, run: RunSettings) -> Baseline:
    """Baseline of a scenario asking for k neighbours and re-scored from k_used (0 = the run's own p_kNN):
    the run itself when nothing is truncated (k_used 0 or >= k), else the run's τ, source and λ re-scored
    from the same k_used stored neighbours."""
    if k_used == 0 or k_used >= k:
        return Baseline(RUN, 0, f"vs the run's own kNN-LM (k = {run.k}, τ = {run.tau:g}, {run.source} distances, "
                                f"λ = {run.lam:g})")
    return Baseline(f"run@{k_used}", k_used,
                    f"vs the run's settings re-scored from the same {k_used} neighbours (τ = {run.tau:g}, "
                    f"{run.source} distances, λ = {run.lam:g})")


def baseline_p(data: StoredNeighbours, base: Baseline, run: RunSettings, p_knn: np.ndarray | None = None) -> np.ndarray:
    """p_kNNLM (T,) of a baseline at the run's λ: the run's own p_kNN for RUN, else `p_knn` (the run's τ and
    source re-scored from base.k_used neighbours; computed here when not given)."""
    if base.k_used == 0:
        return interpolate(data, run.lam)
    if p_knn is None:
        p_knn = rescore(data, base.k_used, run.tau, run.source)
    return interpolate(data, run.lam, p_knn)


def adaptive_note(variants: pd.DataFrame | None, run_ppl: float, corpus: str, n_valid: int) -> str:
    """The sentence about adaptive λ under the per-bin λ editor, from the run's `mitigations` rows (None: the
    run has no mitigation tables); `corpus` is the validation corpus as the page renders it."""
    head = ("Adaptive λ from what is known at test time (nearest neighbour's distance, LM entropy) is fitted on a "
            "validation split")
    if variants is None:
        return head + ", which this run does not have (built without a validation corpus: no mitigation tables)."
    rows = variants[variants["lam_column"].notna()] if "lam_column" in variants else variants.iloc[:0]
    if rows.empty:
        return head + f": this run's ({corpus}, {n_valid:,} tokens) has no adaptive λ variant in its mitigation tables."
    fitted = " and ".join(f"{r['ppl']:,.2f} ({r['label']})" for _, r in rows.iterrows())
    return (head + f": on this run's ({corpus}, {n_valid:,} tokens) it gives PPL {fitted} on the evaluation set, "
            f"against {run_ppl:,.2f} for the run's single λ (Mitigations page).")


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
    `exact` distances; with `idf_weights` (V,) each neighbour's weight is multiplied by idf(value)
    (`rescore.p_knn`; ValueError for k outside 1..S, tau <= 0 or a source the data do not hold)."""
    if source not in data.sources:
        raise ValueError(f"source must be one of {data.sources} (distances the stored neighbours hold)")
    dists = data.dists_pq if source == "pq" else data.dists_exact
    return p_knn(data.nbr_values, dists, data.targets, k, tau, idf_weights, threads)


def interpolate(data: StoredNeighbours, lam: float | np.ndarray, p_knn: np.ndarray | None = None) -> np.ndarray:
    """p_kNNLM (T,) = λ p_kNN + (1 − λ) p_LM; p_kNN defaults to the run's own (exact for any λ)."""
    return knn.interpolate(data.p_lm, data.p_knn_run if p_knn is None else p_knn, lam)


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


def lam_editor_frame(lam_by_bin: dict[int, float]) -> pd.DataFrame:
    """The per-bin λ editor's rows: `bin` (label, e.g. '10–99') and `lam`, bins ascending."""
    bins = sorted(lam_by_bin)
    return pd.DataFrame({"bin": bin_labels(bins), "lam": [float(lam_by_bin[b]) for b in bins]})


def lams_from_editor(frame: pd.DataFrame, lam_by_bin: dict[int, float]) -> dict[int, float]:
    """{bin: λ} from the edited editor rows (labels mapped back to bins); a cleared or out-of-range cell keeps
    the pre-filled λ of `lam_by_bin`."""
    by_label = dict(zip(bin_labels(sorted(lam_by_bin)), sorted(lam_by_bin), strict=True))
    out = dict(lam_by_bin)
    for label, lam in zip(frame["bin"], frame["lam"], strict=True):
        if label in by_label and pd.notna(lam) and 0.0 <= float(lam) <= 1.0:
            out[by_label[label]] = float(lam)
    return out


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
                   doc_id: np.ndarray, n_docs: int, run_lam: float, baselines: dict[str, np.ndarray] | None = None,
                   against: dict[str, str] | None = None) -> pd.DataFrame:
    """Per bin: the run's PPLs (from read.bins.bin_summary, with their intervals), each extra baseline's
    p_kNNLM (T,) as `ppl_<baseline>` with its interval, and for each scenario's p_kNNLM (T,) `ppl_<name>`
    and `change_<name>` relative to its baseline (`against[name]`, default RUN: the run's kNN-LM; paired)
    with SPEC §11 intervals and the verdict `<name>_vs_<baseline>`."""
    baselines, against = baselines or {}, against or {}
    keep = ["freq_bin", "bin", "n_tokens", "n_docs", "ppl_lm", "ppl_lm_ci_lo", "ppl_lm_ci_hi", "ppl_knnlm",
            "ppl_knnlm_ci_lo", "ppl_knnlm_ci_hi"]
    table = run_bins[[c for c in keep if c in run_bins]].rename(
        columns=lambda c: c.replace("ppl_knnlm", "ppl_knnlm_run"))
    nll_of = {RUN: "nll_run", **{b: f"nll_b{i}" for i, b in enumerate(baselines)}}
    with np.errstate(divide="ignore"):
        sums = {"nll_run": -np.log(knn.interpolate(data.p_lm, data.p_knn_run, run_lam)),
                **{nll_of[b]: -np.log(p) for b, p in baselines.items()},
                **{f"nll_{i}": -np.log(p) for i, p in enumerate(scenarios.values())}}
    figs = [bootstrap.ppl(f"ppl_{b}", nll_of[b]) for b in baselines]
    for i, name in enumerate(scenarios):
        base = against.get(name, RUN)
        figs += [bootstrap.ppl(f"ppl_{name}", f"nll_{i}"),
                 bootstrap.ppl_change(f"change_{name}", f"nll_{i}", nll_of[base])]
    ci = intervals.per_position_intervals(doc_id, data.freq_bin, n_docs, sums, figs)
    for name in scenarios:
        intervals.add_verdict(ci, f"change_{name}", f"{name}_vs_{against.get(name, RUN)}", "lower", "higher")
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
