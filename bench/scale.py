"""Benchmark: the Ray executor's overhead against the local one, and the plan's calibration and forecast.

1. The same WikiText-2 slice (default: configs/ci-tiny.toml with a 500,000-token datastore
   and 20,000 evaluation tokens) built twice from scratch in subprocesses: `--executor local`
   and `--executor ray` (a fresh local Ray instance); stage-by-stage seconds from each run's
   stages.json, the Ray / local ratio per stage (goal <= 1.3x) and whether the DuckDB tables
   are identical.
2. `python -m precompute.plan --calibrate`: rates per worker measured on this machine.
3. The plan's prediction for the slice (against the local run's measured stage seconds)
   and for the paper's setting (configs/gpt2-xl-wikitext103.toml) on 8 GPUs.

    nohup python bench/scale.py --work /tmp/scale > /tmp/scale.log 2>&1 &
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from bench.common import BenchParser, DefaultsHelp, size, write_config  # noqa: E402

HEAVY = ("datastore", "eval_lm", "index", "search", "types", "database")



def build(cfg: Path, run_dir: Path, executor: str) -> float:
    """Wall seconds of `python -m precompute` from scratch with `executor`."""
    cmd = [sys.executable, "-m", "precompute", "--config", str(cfg), "--run-dir", str(run_dir), "--executor", executor]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, env={**__import__("os").environ, "TQDM_DISABLE": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def stage_seconds(run_dir: Path) -> dict[str, float]:
    return {k: v["seconds"] for k, v in json.loads((run_dir / "stages.json").read_text()).items()}


def same_tables(a: Path, b: Path) -> bool:
    import pandas as pd
    from test_pipeline import tables

    ta, tb = tables(a), tables(b)
    try:
        for name in ta:
            cols = [c for c in ta[name].columns if c != "run_name"]
            pd.testing.assert_frame_equal(ta[name][cols], tb[name][cols], check_exact=True)
    except (AssertionError, KeyError):
        return False
    return ta.keys() == tb.keys()


def plan(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "precompute.plan", *args], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True)
    return out.stdout


def main(argv: list[str] | None = None) -> int:
    p = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp)
    p.add_argument("--config", default="configs/ci-tiny.toml")
    p.add_argument("--datastore-tokens", type=size, default=500_000)
    p.add_argument("--eval-tokens", type=size, default=20_000)
    p.add_argument("--work", default="/tmp/scale", help="folder for the two runs, config and rates")
    p.add_argument("--skip-runs", action="store_true", help="reuse the runs already in --work (plan steps only)")
    p.add_argument("--skip-calibration", action="store_true", help="reuse --work/rates.json when it exists")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = write_config(REPO_ROOT / args.config, work / "slice.toml", datastore_limit_tokens=args.datastore_tokens,
                       eval_limit_tokens=args.eval_tokens)
    if not args.skip_runs:
        import shutil

        wall = {}
        for executor in ("ray", "local"):  # Ray first: a failure shows early
            shutil.rmtree(work / executor, ignore_errors=True)
            wall[executor] = build(cfg, work / executor, executor)
            print(f"{executor}: {wall[executor]:.1f} s wall", flush=True)
        (work / "wall.json").write_text(json.dumps(wall))
    wall = json.loads((work / "wall.json").read_text())
    local, ray = stage_seconds(work / "local"), stage_seconds(work / "ray")
    print(f"\n1. {args.config} with {args.datastore_tokens:,} datastore tokens: local vs Ray on this machine")
    print(f"   {'stage':20s} {'local s':>8s} {'ray s':>8s} {'ratio':>6s}")
    for name in local:
        ratio = ray[name] / local[name] if local[name] > 0.5 else float("nan")
        print(f"   {name:20s} {local[name]:8.1f} {ray[name]:8.1f} {ratio:6.2f}" + ("" if name not in HEAVY else
              "  (goal <= 1.3)"))
    print(f"   {'wall (process)':20s} {wall['local']:8.1f} {wall['ray']:8.1f} {wall['ray'] / wall['local']:6.2f}")
    print(f"   DuckDB tables identical: {same_tables(work / 'local', work / 'ray')}")
    rates = work / "rates.json"
    print("\n2. calibration (python -m precompute.plan --calibrate)")
    if args.skip_calibration and rates.exists():
        print(f"rates from {rates}:\n{rates.read_text()}")
    else:
        print(plan("--calibrate", "--out", str(rates)))
    for executor in ("local", "ray"):
        print(f"3a. plan for the slice, checked against the {executor} run's measured seconds")
        print(plan("--config", str(cfg), "--gpus", "0", "--cpus", "2", "--rates", str(rates), "--executor", executor,
                   "--measured", str(work / executor)))
    print("3b. plan for the paper's setting on 8 GPUs")
    print(plan("--config", "configs/gpt2-xl-wikitext103.toml", "--gpus", "8", "--cpus", "128"))
    print("3c. the same with this machine's calibrated CPU rates (GPU rate: the H100 default)")
    print(plan("--config", "configs/gpt2-xl-wikitext103.toml", "--gpus", "8", "--cpus", "128", "--rates", str(rates)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
