"""The plan's rows: every stage of `precompute.stages.STAGES` asked for its work, in run order; the
seconds per stage and the disk a run needs."""

from __future__ import annotations

from knnlm_core.config import RunConfig
from precompute.plan.cost import GB, Machine, Model, Rates, StageWork
from precompute.plan.facts import Facts
from precompute.stages import STAGES


def estimate(cfg: RunConfig, f: Facts, rates: Rates, machine: Machine, exact_runs: bool | None = None
             ) -> list[StageWork]:
    """Every stage of the run in pipeline order. The exact stage is always costed; `runs` says whether it runs
    (default: exact_search == "on"; precompute.plan.startup.decide_exact decides "auto")."""
    runs = cfg.exact_search == "on" if exact_runs is None else exact_runs
    model = Model(cfg, f, rates, machine, exact_runs=runs)
    work = []
    for stage in STAGES:
        rows = stage.work(model)
        if rows and stage.mapped:  # a map stage starts its pool of actors once (Ray)
            rows[0].seconds += model.p.start
        work += rows
    return work


def stage_seconds(work: list[StageWork]) -> dict[str, float]:
    """Estimated seconds per pipeline stage (parts summed), in pipeline order, stages that run only."""
    out: dict[str, float] = {}
    for w in work:
        if w.runs:
            out[w.stage] = out.get(w.stage, 0.0) + w.seconds
    return out


def disk(cfg: RunConfig, f: Facts, work: list[StageWork]) -> tuple[float, float]:
    """(shared storage at peak, local disk per node) in bytes: every output the stages that run write,
    counted as kept (keys, indexes, blocks, DuckDB)."""
    shared = sum(w.written for w in work if w.runs) + f.t * 2 * f.shape.d + f.t_valid * 2 * f.shape.d
    local = f.shape.params * (2 if cfg.dtype != "float32" else 4) + 2 * GB  # model cache + Ray session dir
    return shared, local
