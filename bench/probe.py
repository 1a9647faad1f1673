"""Benchmark: the Probe (SPEC §13, issue 24) on a built run: cold (imports, model + index + datastore load,
first probe) and warm (later probes of the same length, and the What-if re-scoring without a search), with
the resident memory the probe adds to the process (goals on the demo, 2 cores: warm <= 1 s, cold <= 10 s
for 512 tokens).

The text is the run's evaluation corpus from its first line, cut to `--tokens` tokens (decoded back to
text); any text would do. Without `--run-dir` a tiny run is built first in a temporary directory with
the test suite's recipe (tests/conftest.py: a 2-layer random GPT-2, 6,000 datastore tokens), which
measures the probe's own overhead rather than a realistic model. The shipped demo keeps no index, keys
or suffix array, so it cannot be probed until they are rebuilt (docs/PROBE.md).

    python bench/probe.py                                  # tiny run built here
    python bench/probe.py --run-dir data/runs/demo-full --tokens 512
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.common import BenchParser, count  # noqa: E402


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tiny_run(root: Path) -> Path:
    """The test suite's tiny run, built in `root`."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import build_tiny_run, make_tiny_model

    return build_tiny_run(root / "tiny", make_tiny_model(root / "tiny-gpt2"))


def probe_text(p, n_tokens: int) -> str:
    """The run's evaluation text cut to n_tokens tokens, as text."""
    from knnlm_core.config import resolve_path
    from knnlm_core.corpus import read_text, tokenize_text

    text = read_text(resolve_path(p.cfg.eval_corpus))[: 20 * n_tokens]
    return p.tokenizer.decode(tokenize_text(text, p.tokenizer)[:n_tokens].tolist())


def main(argv: list[str] | None = None) -> None:
    ap = BenchParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, help="a built run with its index, keys and suffix array (default: a tiny "
                    "run built now)")
    ap.add_argument("--tokens", type=count, default=512, help="tokens per probe")
    ap.add_argument("--repeats", type=count, default=5, help="warm probes timed")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or tiny_run(Path(tmp))
        import numpy as np
        import pandas as pd  # noqa: F401  (the dashboard process has these already)

        base = rss_mb()
        t0 = time.perf_counter()
        from precompute import probe

        p = probe.load(run_dir)
        loaded = time.perf_counter()
        text = probe_text(p, args.tokens)
        t1 = time.perf_counter()
        first = p.score(text)
        cold_probe = time.perf_counter() - t1
        after_first = rss_mb()
        warm = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = p.score(text)
            warm.append(time.perf_counter() - t)
        whatif = []
        for tau in (2.0, 5.0, 20.0):
            t = time.perf_counter()
            probe.rescore(p, res, tau=tau)
            whatif.append(time.perf_counter() - t)
        n = len(first.tokens)
        print(f"run {run_dir} (N = {len(p.values):,} entries, k = {p.k}, {p.cfg.index_factory}, nprobe "
              f"{p.cfg.nprobe}, model {p.cfg.model}), probe of {n + 1} tokens ({n} scored)")
        print(f"cold: load (imports, model, index, datastore) {loaded - t0:.2f} s + first probe {cold_probe:.2f} s "
              f"= {loaded - t0 + cold_probe:.2f} s (goal <= 10 s)")
        print(f"warm: median {np.median(warm):.3f} s, best {min(warm):.3f} s of {len(warm)} (goal <= 1 s)")
        print(f"What-if re-score (no search): median {np.median(whatif) * 1000:.1f} ms")
        print(f"memory added: {after_first - base:,.0f} MB RSS (before load {base:,.0f} MB, after the first probe "
              f"{after_first:,.0f} MB, after the warm probes {rss_mb():,.0f} MB)")


if __name__ == "__main__":
    main()
