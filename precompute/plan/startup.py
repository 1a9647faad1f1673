"""What a run asks of the plan as it starts: the machine it is on, whether `exact_search = "auto"` runs
the exact stage (SPEC §8), and a one-line summary of the estimate.

The auto rule (`decide_exact`): the exact stage runs when its estimate on this machine is at most
AUTO_ALWAYS_S (10 min), or when it is at most AUTO_SHARE (1.0) times the estimate of the rest of
the run and at most AUTO_MAX_S (4 h): exact search may double a run, never by more than four hours.
Estimates use the built-in rates (`Rates()`), so the decision depends on the run's sizes and the
machine, not on a calibration file.
"""

from __future__ import annotations

import os

from knnlm_core.config import RunConfig
from precompute.plan.cost import Machine, Rates
from precompute.plan.facts import Facts
from precompute.plan.rows import estimate, stage_seconds

AUTO_ALWAYS_S = 600.0  # an exact stage this short always runs
AUTO_SHARE = 1.0  # otherwise at most this share of the rest of the run ...
AUTO_MAX_S = 4 * 3600.0  # ... and at most this long


def hms(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else \
        f"{seconds:.0f} s"


def machine_of(cfg: RunConfig, device: str, executor=None) -> Machine:
    """The machine a run's executor gives it: the Ray cluster's GPUs, CPUs and nodes, or this process
    (one GPU when the device is cuda, this machine's cores)."""
    if getattr(executor, "name", "local") == "ray":
        try:
            import ray

            res = ray.cluster_resources()
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            return Machine(int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1))), max(1, nodes), "ray")
        except Exception:  # noqa: BLE001 - no cluster to ask: plan as this one machine
            pass
    return Machine(1 if device == "cuda" else 0, os.cpu_count() or cfg.threads, 1, "local")


def decide_exact(cfg: RunConfig, facts: Facts | None, machine: Machine) -> tuple[bool, str]:
    """(whether the exact stage runs, why): "on" / "off" as configured; "auto" by the rule above."""
    if cfg.exact_search != "auto":
        return cfg.exact_search == "on", f"exact_search = {cfg.exact_search}"
    try:
        seconds = stage_seconds(estimate(cfg, facts, Rates(), machine, exact_runs=True))
    except Exception as err:  # noqa: BLE001 - no estimate: decide without one, and say so
        return False, (f"auto: off, the plan could not estimate the exact stage ({type(err).__name__}: {err}); "
                       "set exact_search = \"on\" to run it")
    exact = seconds.pop("exact")
    rest = sum(seconds.values())
    on = exact <= AUTO_ALWAYS_S or (exact <= AUTO_SHARE * rest and exact <= AUTO_MAX_S)
    why = (f"at most {hms(AUTO_ALWAYS_S)}" if exact <= AUTO_ALWAYS_S else
           f"{'at most' if exact <= AUTO_SHARE * rest else 'more than'} {AUTO_SHARE:g} x the rest of the run "
           f"({hms(rest)}) and {'at most' if exact <= AUTO_MAX_S else 'more than'} {hms(AUTO_MAX_S)}")
    return on, (f"auto: {'on' if on else 'off'}, exact search estimated at {hms(exact)} on {machine.describe()}: "
                f"{why}")


def plan_summary(cfg: RunConfig, facts: Facts | None, machine: Machine | None) -> str:
    """One line: about how long the run takes on this machine and its longest stage ("" if the plan fails:
    it must never stop a run)."""
    try:
        runs, _ = decide_exact(cfg, facts, machine)
        seconds = stage_seconds(estimate(cfg, facts, Rates(), machine, exact_runs=runs))
        longest = max(seconds, key=seconds.get)
        return (f"plan: about {hms(sum(seconds.values()))} on this machine ({machine.describe()}); the longest stage "
                f"is {longest} ({hms(seconds[longest])}); python -m precompute.plan prints every stage")
    except Exception:  # noqa: BLE001 - advice only
        return ""
