"""Plan before you spend: per-stage work, disk, memory and wall time of a run on G GPUs and C CPU cores.

    python -m precompute.plan --config configs/gpt2-xl-wikitext103.toml --gpus 8 --cpus 128 [--rates R.json]
    python -m precompute.plan --calibrate [--out R.json]        # measure rates here with a short real run

Every stage of the pipeline is listed, multi-part stages part by part (each whitening's fit and
index, each neighbour block the search writes, the mitigations' validation and evaluation
scoring); the exact stage is always costed and marked when `exact_search` (or its "auto" rule,
`precompute.plan.startup.decide_exact`) leaves it out. `--measured RUN_DIR` prints the plan
beside a built run's stage seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from knnlm_core.config import RunConfig, load_config
from precompute.cli import Parser, UsageError, int_in, path_arg, run_cli
from precompute.plan.cost import Machine, Model, Rates, StageWork
from precompute.plan.facts import Facts, run_facts
from precompute.plan.rows import disk, estimate, stage_seconds
from precompute.plan.startup import decide_exact, hms


def fmt(x: float, unit: str = "") -> str:
    for cut, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= cut:
            return f"{x / cut:.1f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def row(label: str, w: StageWork, seconds: float, measured: float | None, compare: bool) -> str:
    wall = hms(seconds) if w.runs else f"({hms(seconds)})"
    out = (f"{label:30s} {f'{w.count:,} {w.units}':>20s} {fmt(w.flop):>9s} {fmt(w.read, 'B'):>9s} "
           f"{fmt(w.written, 'B'):>9s} {fmt(w.worker_mem, 'B'):>10s} {wall:>10s}")
    if compare:
        out += f"  {hms(measured):>8s} {100 * (seconds - measured) / measured:+6.0f}%" if measured else f"  {'-':>8s} {'':>7s}"
    return out


def table(work: list[StageWork], measured: dict[str, float] | None, exact_reason: str) -> list[str]:
    """The stage rows: a stage of several parts gets its total and then one indented row per part."""
    lines = [f"{'stage':30s} {'work':>20s} {'FLOP':>9s} {'read':>9s} {'written':>9s} {'mem/worker':>10s} "
             f"{'est. wall':>10s}" + ("  measured   error" if measured else "") + "  where"]
    compare = measured is not None
    stages = list(dict.fromkeys(w.stage for w in work))
    for stage in stages:
        parts = [w for w in work if w.stage == stage]
        m = (measured or {}).get(stage)
        where = parts[0].where if parts[0].runs else f"not run ({exact_reason})"
        if len(parts) == 1 and not parts[0].part:
            lines.append(row(stage, parts[0], parts[0].seconds, m, compare) + f"  {where}")
            continue
        total = StageWork(stage, "", parts[0].units, sum(w.count for w in parts), sum(w.flop for w in parts),
                          sum(w.read for w in parts), sum(w.written for w in parts), max(w.worker_mem for w in parts),
                          runs=parts[0].runs)
        lines.append(row(stage, total, sum(w.seconds for w in parts), m, compare) + f"  {len(parts)} parts")
        lines += [row(f"  {w.part}", w, w.seconds, None, False) + ("  " + " " * 18 if compare else "") + f"  {w.where}"
                  for w in parts]
    return lines


def report(cfg: RunConfig, f: Facts, work: list[StageWork], machine: Machine, exact_reason: str,
           measured: dict[str, float] | None = None) -> str:
    seconds = stage_seconds(work)
    total = sum(seconds.values())
    longest = max(seconds, key=seconds.get)
    shared, local = disk(cfg, f, work)
    lines = [f"plan: {cfg.model} ({f.shape.d}-d keys), {f.n:,} entries, {f.t:,} eval positions"
             + (f", {f.t_valid:,} validation positions" if f.t_valid else "") + f", {f.types:,} types ({f.source}); "
             f"{cfg.index_factory}, nprobe {cfg.nprobe}, k {cfg.k}, shards of {cfg.shard_size:,}; {machine.describe()}",
             *table(work, measured, exact_reason)]
    done = sum(measured.get(s, 0.0) for s in seconds) if measured else 0.0
    lines.append(f"total estimated wall: {hms(total)}; the longest stage is {longest} ({hms(seconds[longest])})"
                 + (f"; measured {hms(done)} ({100 * (total / done - 1):+.0f}%)" if done else ""))
    skipped = sum(w.seconds for w in work if not w.runs)
    lines.append(f"exact search: {exact_reason}" + (f"; running it would add {hms(skipped)}" if skipped else ""))
    model = Model(cfg, f, Rates(), machine)
    driver = f.n * (model.code + 8 + 16) + 2 * f.t * (200 + 16 * cfg.store_neighbors_effective)
    lines.append(f"driver memory: {fmt(driver, 'B')} (the filled index, per-entry PQ error, search results)")
    lines.append(f"disk: shared storage {fmt(shared, 'B')} at peak (keys {fmt(f.n * 2 * f.shape.d, 'B')} fp16, neighbour "
                 f"blocks {fmt(sum(w.written for w in work if w.stage in ('search', 'exact') and w.runs), 'B')}); "
                 f"local per node {fmt(local, 'B')} (model cache + Ray session)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m precompute.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=path_arg, help="TOML preset (see configs/)")
    p.add_argument("--model", help="override the config's model (a local directory or one of KNOWN_MODELS)")
    p.add_argument("--gpus", type=int_in(0, 1 << 20), default=0, help="GPUs in the cluster (0: the model runs on CPU "
                   "cores)")
    p.add_argument("--cpus", type=int_in(1, 1 << 24), default=16, help="CPU cores in the cluster, all nodes together")
    p.add_argument("--nodes", type=int_in(0, 1 << 20), default=0, help="nodes (default: one per 8 GPUs, at least 1)")
    p.add_argument("--executor", choices=["ray", "local"], default="ray", help="local: one worker, no Ray start-up")
    p.add_argument("--faiss-gpu", action="store_true", help="the cluster's faiss has GPU support: index training and "
                   "IVFPQ searches on the GPUs (without it, the plan adds a line with that path's total)")
    p.add_argument("--rates", type=path_arg, help="rates JSON written by --calibrate (default: built-in H100 rates)")
    p.add_argument("--entries", type=int_in(0, 1 << 50), default=0, help="datastore entries, when the corpus is not "
                   "here")
    p.add_argument("--eval-positions", type=int_in(0, 1 << 50), default=0,
                   help="evaluation positions, when the corpus is not here")
    p.add_argument("--measured", type=path_arg, help="a built run directory: print its stage seconds beside the plan")
    p.add_argument("--calibrate", action="store_true", help="measure this machine's rates with a short real run")
    p.add_argument("--calibration-config", type=path_arg, default=Path("configs/ci-tiny.toml"))
    p.add_argument("--out", type=path_arg, help="where --calibrate writes the rates JSON")
    return p.parse_args(argv)


def read_rates(path: Path | None) -> Rates:
    """Rates from a --calibrate JSON file (UsageError naming the fix if unreadable), else the built-in ones.
    Rates a file lacks (written before they existed) keep their built-in values."""
    if path is None:
        return Rates()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        rates = Rates(**data)
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"--rates {path} is not a rates JSON written by --calibrate ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); rerun --calibrate --out {path}") from None
    bad = [k for k, v in asdict(rates).items() if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v) or v <= 0]
    if bad:
        raise UsageError(f"--rates {path}: {bad} must be positive numbers; rerun --calibrate --out {path}")
    return rates


def read_measured(run_dir: Path | None) -> dict[str, float] | None:
    """Stage seconds of a built run (--measured), UsageError naming the fix if it has none."""
    if run_dir is None:
        return None
    try:
        stages = json.loads((Path(run_dir) / "stages.json").read_text(encoding="utf-8"))
        return {k: float(v["seconds"]) for k, v in stages.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UsageError(f"--measured {run_dir} has no readable stages.json ({type(err).__name__}); give a built run "
                         "directory") from None


def plan(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.calibrate:
        from precompute.plan.calibrate import calibrate

        if args.out is not None and not Path(args.out).parent.is_dir():
            raise UsageError(f"--out {args.out}: its folder does not exist")
        with tempfile.TemporaryDirectory() as tmp:
            rates = calibrate(Path(tmp), args.calibration_config)
        text = json.dumps(asdict(rates), indent=2)
        if args.out:
            args.out.write_text(text + "\n")
        print(f"rates measured with {args.calibration_config} on this machine (per core or per worker; the GPU, "
              f"storage, suffix-array and text rates are the built-in ones, not measured here):\n{text}")
        return 0
    if args.config is None:
        raise UsageError("--config is required (or --calibrate)")
    cfg = load_config(args.config, {"model": args.model}, {"model": "--model"})
    rates = read_rates(args.rates)
    measured = read_measured(args.measured)
    machine = Machine(args.gpus, args.cpus, args.nodes or max(1, math.ceil(args.gpus / 8)), args.executor,
                      args.faiss_gpu)
    facts = run_facts(cfg, args.entries, args.eval_positions)
    runs, reason = decide_exact(cfg, facts, machine)
    print(report(cfg, facts, estimate(cfg, facts, rates, machine, exact_runs=runs), machine, reason, measured))
    if machine.gpus and not machine.faiss_gpu and machine.executor == "ray":
        other = replace(machine, faiss_gpu=True)
        seconds = stage_seconds(estimate(cfg, facts, rates, other, exact_runs=runs))
        print(f"with faiss-gpu (--faiss-gpu: index training and IVFPQ searches on the GPUs): total {hms(sum(seconds.values()))}"
              f"; index {hms(seconds['index'])}, search {hms(seconds['search'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: plan(argv), "plan")


if __name__ == "__main__":
    sys.exit(main())
