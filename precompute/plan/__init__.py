"""The plan of a run: its work and wall time per stage on a machine, before any of it is spent.

- `facts`: the sizes a plan is computed from (entries, positions, types, the model's shape);
- `cost`: the cost model (rates, the machine, each stage's work and seconds);
- `startup`: what a starting run asks of it (the summary line, the `exact_search = "auto"` decision);
- `calibrate`: this machine's rates from a short real run;
- `__main__`: the command line, `python -m precompute.plan`.
"""

from precompute.plan.cost import Machine, Rates, StageWork, estimate, stage_seconds
from precompute.plan.facts import KNOWN_MODELS, Facts, ModelShape, plan_facts, run_facts
from precompute.plan.startup import decide_exact, machine_of, plan_summary

__all__ = ["KNOWN_MODELS", "Facts", "Machine", "ModelShape", "Rates", "StageWork", "decide_exact", "estimate",
           "machine_of", "plan_facts", "plan_summary", "run_facts", "stage_seconds"]
