"""Page server times of the dashboard with AppTest on a given runs directory.

    python bench/dashboard.py --runs-dir data/runs --run demo [--pos 1000] [--token the]

Per page: `cold` = first run after clearing every cache (includes opening the database
and, on What-if, loading the stored neighbours), `warm` = median of the next reruns.
Targets (docs/DASHBOARD.md): warm ≤ 1.0 s per page, ≤ 0.3 s for the neighbour inspector.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BenchParser, count  # noqa: E402

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGES = tuple(m.group(1) for m in re.finditer(r'st\.Page\("pages/(\w+)\.py"', Path(APP).read_text(encoding="utf-8"))
              if m.group(1) != "probe")  # every page app.py registers (the probe needs a run built with its index)


def time_page(page: str, run: str, params: dict[str, str], repeats: int) -> tuple[float, float]:
    """(cold seconds, median warm seconds) of one page."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["run"] = run
    at.run()
    at.switch_page(f"pages/{page}.py")
    for key, value in params.items():
        at.query_params[key] = value
    st.cache_data.clear()  # keep the connection, drop query results: cold queries
    t0 = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"{page}: {at.exception[0].message}")
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm)


def main() -> None:
    ap = BenchParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", required=True, type=Path)
    ap.add_argument("--run", required=True)
    ap.add_argument("--pos", default="1000")
    ap.add_argument("--token", default="the")
    ap.add_argument("--repeats", type=count, default=3)
    args = ap.parse_args()
    os.environ["KNNLM_RUNS_DIR"] = str(args.runs_dir.resolve())
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    params = {"tokens": {"token": args.token}, "neighbors": {"pos": args.pos}}
    print(f"{'page':<10} {'cold s':>8} {'warm s':>8}")
    for page in PAGES:
        cold, warm = time_page(page, args.run, params.get(page, {}), args.repeats)
        print(f"{page:<10} {cold:8.3f} {warm:8.3f}")


if __name__ == "__main__":
    main()
