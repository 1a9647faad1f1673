"""Benchmark: a whole precompute run of a preset, with wall time, peak RSS and the stage table.

Runs `python -m precompute --config CONFIG --run-dir DIR` in a subprocess, samples its
/proc/<pid>/status every 0.5 s (VmRSS = RssAnon + RssFile + RssShmem: RssFile is the
file-backed part, i.e. memory-mapped keys / index pages that the kernel can drop), and
prints the wall time, the peak of each, and every stage's seconds (stages.json) beside the
peak RSS sampled while it ran (a stage runs from the previous stage's "done" line to its own).
Goals for `configs/wikitext2.toml` on 2 cores (issue 23, every analysis): <= 45 min wall, <= 6 GB peak RSS.

    python bench/preset.py --config configs/wikitext2.toml --run-dir /tmp/wt2 [--fresh]
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from bench.common import BenchParser  # noqa: E402


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of a process in kB ({} once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[name] = int(rest.split()[0])
    return out


def main(argv: list[str] | None = None) -> int:
    p = BenchParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/wikitext2.toml")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--fresh", action="store_true", help="delete the run directory first (a full build)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "precompute", "--config", args.config, "--run-dir", str(run_dir)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    finished: list[str] = []  # stages whose "[name] done in" / "up to date" line has been printed

    def follow() -> None:
        for line in proc.stdout:  # stage lines come from tqdm.write (stdout), bars from stderr
            sys.stderr.write(line)
            match = re.search(r"^\[(\w+)\] (done in|up to date)", line.split("\r")[-1])
            if match:
                finished.append(match.group(1))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    at_peak, stage_peak = {}, {}  # stage_peak: index of the running stage -> max VmRSS (kB)
    while proc.poll() is None:
        now = status_kb(proc.pid)
        if now.get("VmRSS", 0) > peak["VmRSS"]:
            at_peak = dict(now)
        for name, kb in now.items():
            peak[name] = max(peak[name], kb)
        running = len(finished)
        stage_peak[running] = max(stage_peak.get(running, 0), now.get("VmRSS", 0))
        time.sleep(0.5)
    reader.join()
    wall = time.time() - t0
    if proc.returncode:
        print(f"error: the run exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode
    stages = json.loads((run_dir / "stages.json").read_text())
    print(f"\nwall {wall / 60:.1f} min ({wall:.0f} s) for {args.config}")
    print(f"peak RSS {peak['VmHWM'] / 1e6:.2f} GB (VmHWM); at the sampled peak {at_peak.get('VmRSS', 0) / 1e6:.2f} GB "
          f"= anon {at_peak.get('RssAnon', 0) / 1e6:.2f} GB + file-backed {at_peak.get('RssFile', 0) / 1e6:.2f} GB; "
          f"peak anon alone {peak['RssAnon'] / 1e6:.2f} GB")
    peak_of = {name: stage_peak.get(i, 0) for i, name in enumerate(finished)}
    print("stage                 seconds  peak RSS (GB, sampled while it ran)")
    for name, stage in stages.items():
        print(f"  {name:20s} {stage['seconds']:8.1f}  {peak_of.get(name, 0) / 1e6:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
