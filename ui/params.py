"""URL query parameters of the dashboard: widget keys equal these names (STYLE §11).

A default of None means "the run's own value" (k, τ, λ) or "the whole range" (bin).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS_ENV = "KNNLM_RUNS_DIR"  # overrides the directory that holds the runs

URL_PARAMS: dict[str, object] = {
    "run": "demo",  # run directory name under the runs root (sidebar picker)
    "bin": None,  # (low, high) frequency-bin range on the bins page
    "pos": 0,  # evaluation position on the neighbour inspector
    "token": "",  # token text or id, a word or any text on the token explorer
    "level": "token",  # token | word level on the bins page
    "k": None,  # what-if k (default: min(run.k, stored neighbours))
    "tau": None,  # what-if temperature (default: the run's)
    "lam": None,  # what-if λ (default: the run's)
    "variant": "plain",  # mitigation variant of the first run on the compare page
    "variant_b": "plain",  # mitigation variant of the second run on the compare page
}

PAGES = {  # page file -> URL path
    "overview": "pages/overview.py",
    "bins": "pages/bins.py",
    "tokens": "pages/tokens.py",
    "neighbors": "pages/neighbors.py",
    "exact": "pages/exact.py",
    "whatif": "pages/whatif.py",
    "mitigations": "pages/mitigations.py",
    "compare": "pages/compare.py",
}


def runs_root() -> Path:
    """Directory holding the runs: $KNNLM_RUNS_DIR, else <repo>/data/runs."""
    env = os.environ.get(RUNS_ENV)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data" / "runs"


def list_runs(root: Path | None = None) -> list[str]:
    """Names of the directories under the root that hold a metrics.duckdb, sorted."""
    root = runs_root() if root is None else root
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "metrics.duckdb").is_file())


def default_run(runs: list[str]) -> str | None:
    """The URL default run when present, else the first run, else None."""
    if not runs:
        return None
    return URL_PARAMS["run"] if URL_PARAMS["run"] in runs else runs[0]
