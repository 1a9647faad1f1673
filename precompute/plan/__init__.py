"""The plan of a run: its work and wall time per stage on a machine, before any of it is spent.

- `facts`: the sizes a plan is computed from (entries, positions, types, the model's shape);
- `cost`: the cost model (rates, the machine, the pieces a stage's work is costed with);
- `rows`: every stage of `precompute.stages.STAGES` asked for its work, in run order;
- `startup`: what a starting run asks of it (the summary line, the `exact_search = "auto"` decision);
- `calibrate`: this machine's rates from a short real run;
- `__main__`: the command line, `python -m precompute.plan`.

The names below are imported on first use (PEP 562), so that `precompute.stages` (which the
rows import) can import `precompute.plan.cost` without importing the rows back.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {"Machine": "cost", "Rates": "cost", "StageWork": "cost", "estimate": "rows", "stage_seconds": "rows",
         "KNOWN_MODELS": "facts", "Facts": "facts", "ModelShape": "facts", "plan_facts": "facts",
         "run_facts": "facts", "decide_exact": "startup", "machine_of": "startup", "plan_summary": "startup"}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
