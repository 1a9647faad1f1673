"""What a pipeline stage is: one self-describing unit that the runner and the planner iterate.

A `Stage` says what it needs (the upstream stages whose keys enter its key), its key fields,
its outputs, its run function, whether a run has it, and its work for the planner. The ordered
list of every stage is `precompute.stages.STAGES`. This module imports nothing heavy: the run
function is named ("module:function") and imported only when the stage runs, so the planner
(`python -m precompute.plan`) reads the list without torch, faiss, pandas or DuckDB.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from knnlm_core.config import RunConfig
    from precompute.plan.cost import Model, StageWork
    from precompute.runner import Run

Keys = Mapping[str, "str | None"]  # stage name -> its key digest this run (None: the stage is not in the run)


def always(_run: Run) -> bool:
    return True


def no_work(_m: Model) -> list[StageWork]:
    return []


@dataclass(frozen=True)
class Stage:
    """One pipeline stage (stages.json records it under `name`)."""

    name: str
    needs: tuple[str, ...]  # upstream stages whose key digests enter this stage's key (None where not run)
    key: Callable[[Run, Keys], dict[str, Any]]  # the key fields: what the outputs depend on (resume test)
    outputs: Callable[[RunConfig], list[str]]  # files, relative to the run directory, checked on resume
    body: str  # "module:function": the run function, called as function(run, key) -> info dict | None
    doc: str  # one line: what the stage computes (docs/ARCHITECTURE.md lists them)
    enabled: Callable[[Run], bool] = always  # whether this run has the stage (run.cfg, run.info)
    work: Callable[[Model], list[StageWork]] = no_work  # the planner's rows (precompute.plan.cost)
    mapped: bool = False  # a map over shards on the executor's workers (the plan adds a pool's start once)
    after: Callable[[Run], None] | None = None  # what the run learns once the outputs exist (run.info facts)

    def run(self, run: Run, key: str) -> dict | None:
        """Call the stage's run function (imported now: the heavy modules load only for stages that run)."""
        module, _, function = self.body.partition(":")
        return getattr(importlib.import_module(module), function)(run, key)
