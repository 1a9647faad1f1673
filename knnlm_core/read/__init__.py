"""The dashboard's read side (SPEC §6–§12), one module per feature, each holding its SQL, its SPEC §11 intervals
and its verdicts: `run` (run metadata, filters, shared helpers), `bins` (per-bin summaries, overall,
correlations), `tokens` (token types and occurrences), `inspector` (one evaluation position and its neighbours),
`exact` (SPEC §8), `words` (SPEC §10), `mitigations` (SPEC §9), `novelty` (SPEC §12), `compare` (two runs or
variants), `findings` (the paper's checklist); `ci` and `verdict` are the interval and verdict machinery they share.

`REGISTRY` maps each public function's name to the function: the dashboard's cache (ui.cache.q) runs a query
by name from it. Names are unique across the feature modules (checked at import).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from types import ModuleType

FEATURES = ("run", "ci", "bins", "tokens", "inspector", "exact", "words", "mitigations", "novelty", "compare", "verdict",
            "findings")
MODULES: tuple[ModuleType, ...] = tuple(importlib.import_module(f"{__name__}.{m}") for m in FEATURES)


def _public_functions() -> dict[str, Callable]:
    """{name: function} of every public function defined in MODULES (not the ones they import)."""
    out: dict[str, Callable] = {}
    for mod in MODULES:
        for name, fn in vars(mod).items():
            if inspect.isfunction(fn) and fn.__module__ == mod.__name__ and not name.startswith("_"):
                if name in out:
                    raise RuntimeError(f"{name} is defined in {out[name].__module__} and {mod.__name__}")
                out[name] = fn
    return out


REGISTRY = _public_functions()
