"""Rates of this machine (`Rates`): measured by a short real run (`calibrate`), or fitted to the stage
seconds of finished runs (`fit_to_runs`), each rate with its source.

`fit_to_runs` scales the rates so that the plan of each finished run matches its measured stage
seconds (stages.json): a stage's planned seconds depend on a few rates (`shares`: the part of the
stage's seconds each rate accounts for, found by doubling the rate), and each round moves every rate
by the seconds-weighted geometric mean of plan / measured over the (run, stage) pairs that depend on
it (weight = the rate's share x the measured seconds: long stages, less start-up noise, count more);
rounds repeat until the plan stops moving. A rate no measured stage depends on keeps its value and
source (GPU rates on a CPU machine, storage reads, Ray pool starts under the local executor).

`calibrate` builds `CALIBRATION` (ci-tiny grown so per-unit work, not start-up, dominates: every
stage, both whitenings, a validation split, exact search on; ~3 min on 2 cores), times a few calls
directly on its files (the split between per-query and per-visit search cost, flat-search FLOP/s,
key passes, neighbour gathers, scoring), then fits all rates to the run's stage seconds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from knnlm_core.config import RunConfig, load_config, resolve_path
from precompute.plan.cost import Machine, Rates, ivf, pools, train_parts
from precompute.plan.facts import Facts, assemble, model_shape
from precompute.plan.rows import estimate, stage_seconds

BUILT_IN = "assumed: built-in (H100 host)"
GPU_RATES = ("gpu_flops", "gpu_exact_flops", "gpu_encode_flops", "gpu_visits")
# the calibration run: configs/ci-tiny.toml grown to ~3 min on 2 cores, every stage of the pipeline
CALIBRATION = {"datastore_limit_tokens": 200_000, "eval_limit_tokens": 8_000, "index_factory": "IVF256,PQ64",
               "nprobe": 16, "valid_corpus": "data/corpora/wikitext2-valid.raw.gz", "valid_limit_tokens": 4_000,
               "whiten": "zipfian,entries", "exact_search": "on"}
FIT_ROUNDS = 60  # at most; a fit stops earlier once no stage's plan moves by 0.1%
TRAIN_RATES = ("train_flops", "pq_train_flops")  # coarse and PQ k-means, in train_parts' order
MIN_SECONDS = 0.05  # stages measured shorter than this inform no rate (timer resolution 0.01 s)


def rate_names() -> list[str]:
    return [f.name for f in fields(Rates)]


def is_duration(name: str) -> bool:
    """Rates in seconds per unit (query_s, ...): the stage's time grows with them; the others are throughputs."""
    return name.endswith("_s")


def built_in_sources() -> dict[str, str]:
    return dict.fromkeys(rate_names(), BUILT_IN)


def is_measured(source: str) -> bool:
    return source.startswith("measured")


# ---------------------------------------------------------------- finished runs

@dataclass(frozen=True)
class FinishedRun:
    """A built (or partly built) run: its config, sizes, the machine it ran on and its measured stage seconds."""

    name: str
    cfg: RunConfig
    facts: Facts
    machine: Machine
    seconds: dict[str, float]  # stages.json's seconds per stage that ran
    train_seconds: float = 0.0  # the index stage's k-means training alone (its info), 0 if unknown


def read_run(run_dir: Path, executor: str = "local") -> FinishedRun:
    """A run directory's config (run_config.json), sizes (its token files) and stage seconds (stages.json);
    the machine: its config's threads, one GPU if the datastore stage ran on cuda."""
    import numpy as np

    from precompute.stages.types import contamination_groups

    run_dir = Path(run_dir)
    stages = json.loads((run_dir / "stages.json").read_text(encoding="utf-8"))
    recorded = json.loads((run_dir / "run_config.json").read_text(encoding="utf-8"))
    cfg = load_config(None, recorded)
    shape = model_shape(cfg)
    ds = np.load(run_dir / "datastore_ids.npy", mmap_mode="r")
    n_eval = len(np.load(run_dir / "eval_ids.npy", mmap_mode="r")) - 1
    valid = run_dir / "valid_ids.npy"
    t_valid = len(np.load(valid, mmap_mode="r")) - 1 if cfg.valid_corpus and valid.exists() else 0
    freq = np.bincount(np.asarray(ds[1:]), minlength=shape.vocab)
    facts = assemble(cfg, shape, len(ds) - 1, n_eval, t_valid, int((freq > 0).sum()),
                     len(contamination_groups(freq)), "counted by the run")
    device = str(stages.get("datastore", {}).get("info", {}).get("device", "cpu"))
    machine = Machine(1 if device.startswith("cuda") else 0, cfg.threads, 1, executor)
    seconds = {k: float(v["seconds"]) for k, v in stages.items()}
    train = float(stages.get("index", {}).get("info", {}).get("index_train_seconds", 0.0) or 0.0)
    return FinishedRun(run_dir.name, cfg, facts, machine, seconds, train)


def plan_of(run: FinishedRun, rates: Rates) -> dict[str, float]:
    """Planned seconds per stage of `run` (the exact stage counted when the run has it)."""
    return stage_seconds(estimate(run.cfg, run.facts, rates, run.machine, exact_runs="exact" in run.seconds))


def shares(cfg: RunConfig, f: Facts, rates: Rates, machine: Machine, exact_runs: bool
           ) -> dict[str, dict[str, float]]:
    """Per stage (run or not), the share of its planned seconds each rate accounts for (a throughput:
    t = A / rate + B, A / rate = 2 (t - t with the rate doubled); a duration: t = A rate + B, A rate =
    t with it doubled - t); rates with no share are left out."""
    def plan(r: Rates) -> dict[str, float]:
        work = estimate(cfg, f, r, machine, exact_runs=exact_runs)
        return {s: sum(w.seconds for w in work if w.stage == s) for s in dict.fromkeys(w.stage for w in work)}

    base = plan(rates)
    out: dict[str, dict[str, float]] = {s: {} for s in base}
    for name in rate_names():
        doubled = plan(replace(rates, **{name: 2 * getattr(rates, name)}))
        for s, t in base.items():
            change = doubled.get(s, t) - t if is_duration(name) else 2 * (t - doubled.get(s, t))
            share = change / t if t > 0 else 0.0
            if share > 1e-3:
                out[s][name] = min(share, 1.0)
    return out


def run_shares(run: FinishedRun, rates: Rates) -> dict[str, dict[str, float]]:
    return shares(run.cfg, run.facts, rates, run.machine, "exact" in run.seconds)


def training_rates(trained: list[FinishedRun], values: dict[str, float], sources: dict[str, str]
                   ) -> dict[str, float]:
    """From runs whose index stage timed its k-means alone: per run, one training rate solved so the training's
    plan equals those seconds, the other part kept: the part whose rate is not measured yet (calibrate times
    the coarse k-means), else the larger part by planned seconds; over runs, the geometric mean weighted by
    training seconds."""
    logs: dict[str, list[tuple[float, float]]] = {}
    for r in trained:
        cores = driver_cores(r)
        parts = dict(zip(TRAIN_RATES, train_parts(r.cfg, r.facts), strict=True))
        spent = {n: flop / values[n] / cores for n, flop in parts.items()}
        open_ = [n for n in TRAIN_RATES if not is_measured(sources.get(n, BUILT_IN)) and parts[n] > 0]
        big = open_[0] if len(open_) == 1 else max(spent, key=spent.get)
        rest = r.train_seconds - sum(t for n, t in spent.items() if n != big)
        if rest > 0 and parts[big] > 0:
            logs.setdefault(big, []).append((r.train_seconds, math.log(parts[big] / rest / cores)))
    return {n: math.exp(sum(w * x for w, x in xs) / sum(w for w, _ in xs)) for n, xs in logs.items()}


def driver_cores(run: FinishedRun) -> int:
    return pools(run.cfg, run.machine, Rates()).driver


def informative(run: FinishedRun, stage_name: str) -> bool:
    return run.seconds.get(stage_name, 0.0) >= MIN_SECONDS


def fit_to_runs(rates: Rates, sources: dict[str, str], runs: list[FinishedRun], what: str = ""
                ) -> tuple[Rates, dict[str, str]]:
    """Rates scaled so each run's plan matches its measured stage seconds (the module's docstring says how),
    and their sources (`what` names the runs there; default: their directory names)."""
    what = what or "run" + ("s " if len(runs) > 1 else " ") + ", ".join(r.name for r in runs)
    values = {n: float(getattr(rates, n)) for n in rate_names()}
    informed: dict[str, set[str]] = {}
    trained = [r for r in runs if r.train_seconds >= MIN_SECONDS and "index" in r.seconds]
    solved = training_rates(trained, values, sources)
    values.update(solved)
    for _ in range(FIT_ROUNDS):
        current = Rates(**values)
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        moved = 0.0
        for run in runs:
            plan, split = plan_of(run, current), run_shares(run, current)
            for s, parts in split.items():
                if not informative(run, s) or plan.get(s, 0.0) <= 0:
                    continue
                err = math.log(plan[s] / run.seconds[s])
                moved = max(moved, abs(err))
                for name, share in parts.items():
                    w = share * run.seconds[s]
                    num[name] = num.get(name, 0.0) + w * err
                    den[name] = den.get(name, 0.0) + w
                    informed.setdefault(name, set()).add(s)
        if moved < 1e-3:
            break
        for name in num:
            if trained and name in TRAIN_RATES:
                continue
            step = num[name] / den[name]  # plan too long (> 0): a throughput goes up, a duration down
            values[name] *= math.exp(-step if is_duration(name) else step)
    fitted = Rates(**values)
    out = dict(sources)
    for name in solved:
        out[name] = (f"measured: the index stage's k-means seconds (stages.json info index_train_seconds) of {what}"
                     f" (x{values[name] / getattr(rates, name):.3g})")
    for name, stages in informed.items():
        if trained and name in TRAIN_RATES:
            continue
        factor = values[name] / getattr(rates, name)
        how = f"fitted to the {', '.join(sorted(stages))} seconds of {what} (x{factor:.3g})"
        out[name] = f"{sources[name]}; {how}" if is_measured(sources[name]) else f"measured: {how}"
    return fitted, out


# ---------------------------------------------------------------- rates files

def rates_json(rates: Rates, sources: dict[str, str]) -> str:
    """The rates file: every rate, and "source": how each was obtained."""
    return json.dumps({**asdict(rates), "source": {n: sources[n] for n in rate_names()}}, indent=2)


def parse_rates(data: object, start: Rates, sources: dict[str, str], label: str) -> tuple[Rates, dict[str, str]]:
    """`start` with the rates a file's JSON object carries (any subset) laid over it; ValueError naming the
    first bad field. A rate without a "source" entry is recorded as read from `label`."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    given = {k: v for k, v in data.items() if k != "source"}
    unknown = sorted(set(given) - set(rate_names()))
    if unknown:
        raise ValueError(f"unknown rates {unknown}")
    bad = [k for k, v in given.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
           or v <= 0]
    if bad:
        raise ValueError(f"{bad} must be positive numbers")
    told = data.get("source", {})
    if not isinstance(told, dict) or not all(isinstance(v, str) for v in told.values()):
        raise ValueError('"source" must map rate names to text')
    out = dict(sources)
    for k in given:
        out[k] = told.get(k) or f"measured: read from {label}"
    return replace(start, **{k: float(v) for k, v in given.items()}), out


# ---------------------------------------------------------------- calibration: a short real run

def calibration_config(config: str | Path) -> RunConfig:
    """`config` (default ci-tiny) with CALIBRATION's sizes: every stage, per-unit work over start-up."""
    return load_config(resolve_path(str(config)), CALIBRATION)


def calibrate(work_dir: Path, config: str | Path = "configs/ci-tiny.toml", log: Callable[[str], None] = print
              ) -> tuple[Rates, dict[str, str], FinishedRun]:
    """This machine's CPU rates and their sources: build the calibration run (local executor) in `work_dir`,
    time a few calls on its files, fit every rate its stages depend on to its stage seconds."""
    from precompute.pipeline import build_run

    cfg = calibration_config(config)
    run_dir = Path(work_dir) / "calibration"
    t0 = time.time()
    build_run(cfg, run_dir)
    run = read_run(run_dir)
    log(f"calibration run built in {time.time() - t0:.0f} s: {run.facts.n:,} keys, {run.facts.t:,} eval and "
        f"{run.facts.t_valid:,} validation positions; stage seconds " +
        ", ".join(f"{k} {v:.1f}" for k, v in run.seconds.items()))
    rates, sources = timed_rates(run_dir, run, log)
    return (*fit_to_runs(rates, sources, [run], f"the calibration run ({Path(config).name} grown by CALIBRATION)"),
            run)


def timed_rates(run_dir: Path, run: FinishedRun, log: Callable[[str], None]) -> tuple[Rates, dict[str, str]]:
    """Rates timed directly on the calibration run's files (per core), each call guarded: one that fails
    (the code it times changed) leaves its rates to the fit, and says so."""
    cfg, f = run.cfg, run.facts
    cores, d = cfg.threads, f.shape.d
    nlist, _ = ivf(cfg)
    values: dict[str, float] = {}
    sources = built_in_sources()
    calls: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("knnlm_core.metrics.exact_knn over the run's keys",
         lambda: {"flat_flops": time_flat(run_dir, min(f.types, 2048))}),
        ("precompute.stages.types.centroid_sums over every key shard",
         lambda: {"types_bytes": time_key_pass(run_dir, cfg.shard_size) / cores}),
        ("precompute.search.neighbour_sq_dists on the (eval, plain) block's neighbours",
         lambda: {"gather_bytes": time_gather(run_dir, cfg.k) / cores}),
        ("precompute.stages.mitigate.score_rows on the (eval, plain) block",
         lambda: {"score_elems": time_scores(run_dir, cfg)}),
    ]
    calls.append(("faiss.Kmeans (1,024 centroids, 5 iterations) on 65,536 of the run's keys",
                  lambda: {"train_flops": time_kmeans(run_dir) / cores}))
    for how, call in calls:
        try:
            got = call()
        except Exception as err:  # noqa: BLE001 - the fit covers what a failed timing leaves
            log(f"timed call {how} failed ({type(err).__name__}: {err}); its rate is fitted from the stage seconds")
            continue
        for k, v in got.items():
            if v > 0 and math.isfinite(v):
                values[k], sources[k] = v, f"measured: {how}"
    try:  # the search's split between a fixed per-query cost and a per-visit cost: two nprobe values
        query_s, visit_rate = time_search(run_dir, cfg, f)
        flat, gather = values.get("flat_flops", Rates.flat_flops), values.get("gather_bytes", Rates.gather_bytes)
        fixed = query_s * cores - 2 * d * (nlist + 256) / flat - cfg.k * 2 * d / gather
        values["visits"], values["query_s"] = visit_rate / cores, max(fixed, 1e-6)
        how = "measured: precompute.search.search_rows timed at nprobe 1 and nlist / 2 (slope: visits; rest: per query)"
        sources["visits"] = sources["query_s"] = how
    except Exception as err:  # noqa: BLE001
        log(f"timed search failed ({type(err).__name__}: {err}); its rates are fitted from the stage seconds")
    return replace(Rates(), **values), sources


def time_search(run_dir: Path, cfg: RunConfig, f: Facts) -> tuple[float, float]:
    """(seconds per query on all cores at nprobe 1, IVF code visits per second on all cores): the search
    stage's own row function timed at two nprobe values over the same queries."""
    import numpy as np

    from knnlm_core.index import set_nprobe
    from knnlm_core.keystore import open_keys
    from precompute.runner import read_index
    from precompute.search import search_rows

    index = read_index(run_dir / "index.faiss")
    keys, values = open_keys(run_dir), np.load(run_dir / "values.npy")
    queries = np.load(run_dir / "queries.npy")[:2048]
    nlist, _ = ivf(cfg)
    points = []
    for nprobe in (1, max(2, nlist // 2)):
        set_nprobe(index, nprobe)
        t0 = time.time()
        search_rows(index, keys, values, queries, 0, len(queries), cfg.k, cfg.search_batch)
        points.append((nprobe * f.n / nlist, (time.time() - t0) / len(queries)))
    (v1, t1), (v2, t2) = points
    per_visit = max((t2 - t1) / (v2 - v1), 1e-12)
    return max(t1 - v1 * per_visit, 1e-6), 1 / per_visit


def time_kmeans(run_dir: Path, k: int = 1024, n: int = 65536, niter: int = 5) -> float:
    """Coarse k-means FLOP/s on all cores (2 d n k per iteration, faiss's BLAS assignment), on the run's keys."""
    import faiss
    import numpy as np

    from knnlm_core.keystore import open_keys

    keys = np.asarray(open_keys(run_dir)[:n], dtype=np.float32)
    km = faiss.Kmeans(keys.shape[1], k, niter=niter, seed=0, max_points_per_centroid=n)
    t0 = time.time()
    km.train(keys)
    return 2 * niter * len(keys) * k * keys.shape[1] / (time.time() - t0)


def time_gather(run_dir: Path, k: int, n_queries: int = 2048) -> float:
    """Key bytes/s on all cores of the exact distances of k neighbours per query (the search's
    precompute.search.neighbour_sq_dists), on the (eval, plain) block's own neighbours."""
    import numpy as np

    from knnlm_core import neighbours
    from knnlm_core.keystore import open_keys
    from precompute.search import neighbour_sq_dists, resident_keys

    keys = resident_keys(open_keys(run_dir))  # as the search stage holds them: float32 rows, 4 d bytes each
    block = neighbours.open_block(neighbours.block_dir(run_dir, "eval", "plain"))
    rows = min(n_queries, block.shards[-1][1])
    ids = block.rows("ids", 0, rows)
    q = np.load(run_dir / "queries.npy")[:rows].astype(np.float32)
    t0 = time.time()
    neighbour_sq_dists(q, keys, ids)
    return ids.size * keys.shape[1] * 4 / (time.time() - t0)


def time_flat(run_dir: Path, n_queries: int) -> float:
    """Exact (flat) search FLOP/s per core: as many queries as a contamination group has, against every key."""
    import faiss
    import numpy as np

    from knnlm_core.keystore import open_keys
    from knnlm_core.metrics import exact_knn

    keys = open_keys(run_dir)
    q = np.asarray(keys[:n_queries], dtype=np.float32)
    t0 = time.time()
    exact_knn(q, keys, 16)
    return 2 * len(q) * len(keys) * keys.shape[1] / (time.time() - t0) / faiss.omp_get_max_threads()


def time_key_pass(run_dir: Path, shard_size: int) -> float:
    """Key bytes/s on all cores of one per-type pass (the centroid sums of the types stage) over the run's keys."""
    import numpy as np

    from knnlm_core.keystore import open_keys
    from precompute.stages.types import centroid_sums

    keys, values = open_keys(run_dir), np.load(run_dir / "values.npy")
    t0 = time.time()
    for lo in range(0, len(keys), shard_size):
        centroid_sums(np.asarray(keys[lo : lo + shard_size], dtype=np.float32), values[lo : lo + shard_size])
    return keys.shape[0] * keys.shape[1] * 2 / (time.time() - t0)


def time_scores(run_dir: Path, cfg: RunConfig) -> float:
    """Neighbour scores per second (one worker) of the mitigate stage's scoring, on the run's (eval, plain) block."""
    import numpy as np

    from knnlm_core import neighbours
    from precompute.stages.mitigate import ROWS, score_rows

    block = neighbours.open_block(neighbours.block_dir(run_dir, "eval", "plain"))
    targets = np.load(run_dir / "eval_ids.npy")[1:].astype(np.int64)
    rows = min(len(targets), ROWS)
    taus = np.array([1.0, 10.0, 100.0])
    t0 = time.time()
    score_rows(block, "dist_pq", 0, rows, targets, taus, None)
    return rows * cfg.k * len(taus) / (time.time() - t0)


def stage_rates(work_shares: dict[str, dict[str, float]], sources: dict[str, str]) -> dict[str, str]:
    """Per stage, a short note on its rates: "measured", "assumed" or "partly measured (assumed: ...)"."""
    out = {}
    for s, parts in work_shares.items():
        assumed = [n for n in parts if not is_measured(sources.get(n, BUILT_IN))]
        out[s] = ("assumed" if len(assumed) == len(parts) else "measured" if not assumed
                  else f"partly measured (assumed: {', '.join(assumed)})") if parts else "-"
    return out


def fit_errors(runs: Iterable[FinishedRun], rates: Rates) -> list[str]:
    """One line per run: plan / measured per stage after a fit (what the fit could not reconcile shows here)."""
    lines = []
    for run in runs:
        plan = plan_of(run, rates)
        lines.append(f"{run.name}: " + ", ".join(
            f"{s} {plan[s]:.1f}/{run.seconds[s]:.1f} s ({100 * (plan[s] / run.seconds[s] - 1):+.0f}%)"
            for s in plan if informative(run, s)))
    return lines
