"""Plan before you spend: per-stage work, disk, memory and wall time of a run on G GPUs and C CPU cores.

    python -m precompute.plan --config configs/gpt2-xl-wikitext103.toml --gpus 8 --cpus 128 [--rates R.json]
    python -m precompute.plan --calibrate [--out R.json]        # measure rates here with a short real run
    python -m precompute.plan --rates-from-run RUN [RUN ...] [--rates R.json] --out R2.json   # fit to built runs

Every stage of the pipeline is listed, multi-part stages part by part (each whitening's fit and
index, each neighbour block the search writes, the mitigations' validation and evaluation
scoring); the exact stage is always costed and marked when `exact_search` (or its "auto" rule,
`precompute.plan.startup.decide_exact`) leaves it out. `--measured RUN_DIR` prints the plan
beside a built run's stage seconds. Each stage row says whether the rates its time depends on are
measured (by --calibrate, fitted to built runs, or read from a file that says so) or assumed (the
built-in rates from the H100 host); the rates' sources are listed under the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from knnlm_core.config import RunConfig, load_config
from precompute.cli import Parser, UsageError, int_in, path_arg, run_cli
from precompute.plan.calibrate import (
    built_in_sources,
    fit_errors,
    fit_to_runs,
    is_measured,
    parse_rates,
    rates_json,
    read_run,
    shares,
    stage_rates,
)
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


def table(work: list[StageWork], measured: dict[str, float] | None, exact_reason: str,
          notes: dict[str, str] | None = None) -> list[str]:
    """The stage rows: a stage of several parts gets its total and then one indented row per part;
    `notes`: per stage, whether its rates are measured (appended to the stage's row)."""
    lines = [f"{'stage':30s} {'work':>20s} {'FLOP':>9s} {'read':>9s} {'written':>9s} {'mem/worker':>10s} "
             f"{'est. wall':>10s}" + ("  measured   error" if measured else "") + "  where"]
    compare = measured is not None
    stages = list(dict.fromkeys(w.stage for w in work))
    for stage in stages:
        parts = [w for w in work if w.stage == stage]
        m = (measured or {}).get(stage)
        where = parts[0].where if parts[0].runs else f"not run ({exact_reason})"
        note = f"  [rates: {notes[stage]}]" if notes and stage in notes else ""
        if len(parts) == 1 and not parts[0].part:
            lines.append(row(stage, parts[0], parts[0].seconds, m, compare) + f"  {where}{note}")
            continue
        total = StageWork(stage, "", parts[0].units, sum(w.count for w in parts), sum(w.flop for w in parts),
                          sum(w.read for w in parts), sum(w.written for w in parts), max(w.worker_mem for w in parts),
                          runs=parts[0].runs)
        lines.append(row(stage, total, sum(w.seconds for w in parts), m, compare) + f"  {len(parts)} parts{note}")
        lines += [row(f"  {w.part}", w, w.seconds, None, False) + ("  " + " " * 18 if compare else "") + f"  {w.where}"
                  for w in parts]
    return lines


def report(cfg: RunConfig, f: Facts, work: list[StageWork], machine: Machine, exact_reason: str,
           measured: dict[str, float] | None = None, rates: Rates | None = None,
           sources: dict[str, str] | None = None) -> str:
    seconds = stage_seconds(work)
    total = sum(seconds.values())
    rates, sources = rates or Rates(), sources or built_in_sources()
    split = shares(cfg, f, rates, machine, exact_runs=any(w.runs for w in work if w.stage == "exact"))
    notes = stage_rates(split, sources)
    longest = max(seconds, key=seconds.get)
    shared, local = disk(cfg, f, work)
    lines = [f"plan: {cfg.model} ({f.shape.d}-d keys), {f.n:,} entries, {f.t:,} eval positions"
             + (f", {f.t_valid:,} validation positions" if f.t_valid else "") + f", {f.types:,} types ({f.source}); "
             f"{cfg.index_factory}, nprobe {cfg.nprobe}, k {cfg.k}, shards of {cfg.shard_size:,}; {machine.describe()}",
             *table(work, measured, exact_reason, notes)]
    done = sum(measured.get(s, 0.0) for s in seconds) if measured else 0.0
    lines.append(f"total estimated wall: {hms(total)}; the longest stage is {longest} ({hms(seconds[longest])})"
                 + (f"; measured {hms(done)} ({100 * (total / done - 1):+.0f}%)" if done else ""))
    skipped = sum(w.seconds for w in work if not w.runs)
    lines.append(f"exact search: {exact_reason}" + (f"; running it would add {hms(skipped)}" if skipped else ""))
    model = Model(cfg, f, Rates(), machine)
    driver = f.n * (model.code + 8 + 16) + 2 * f.t * (200 + 16 * cfg.store_neighbors_effective)
    lines.append(f"driver memory: {fmt(driver, 'B')} (the filled index, per-entry PQ error, search results)")
    used = sorted({n for parts in split.values() for n in parts})
    measured_n = sum(is_measured(sources[n]) for n in used)
    lines.append(f"rates: {measured_n} of the {len(used)} rates this plan uses are measured"
                 + ("" if measured_n else " (none: the built-in H100-host rates; --calibrate measures this machine's)"))
    lines += [f"  {n} = {getattr(rates, n):.4g}: {sources[n]}" for n in used]
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
    p.add_argument("--rates", type=path_arg, nargs="+", default=[], help="rates JSON files (--calibrate, "
                   "--rates-from-run, or a device check's GPU rates: any subset of the rates), laid over the built-in "
                   "H100-host rates in the order given")
    p.add_argument("--rates-from-run", type=path_arg, nargs="+", default=[], metavar="RUN_DIR",
                   help="built runs (local executor): fit the rates (from --rates, else built-in) to their stage "
                   "seconds; with --out, write them")
    p.add_argument("--entries", type=int_in(0, 1 << 50), default=0, help="datastore entries, when the corpus is not "
                   "here")
    p.add_argument("--eval-positions", type=int_in(0, 1 << 50), default=0,
                   help="evaluation positions, when the corpus is not here")
    p.add_argument("--measured", type=path_arg, help="a built run directory: print its stage seconds beside the plan")
    p.add_argument("--calibrate", action="store_true", help="measure this machine's rates with a short real run")
    p.add_argument("--calibration-config", type=path_arg, default=Path("configs/ci-tiny.toml"),
                   help="base preset of the calibration run (grown by precompute.plan.calibrate.CALIBRATION)")
    p.add_argument("--calibration-dir", type=path_arg, help="keep the calibration run in DIR/calibration (default: "
                   "a temporary folder, removed)")
    p.add_argument("--out", type=path_arg, help="where --calibrate / --rates-from-run write the rates JSON")
    return p.parse_args(argv)


def read_rates_files(paths: list[Path]) -> tuple[Rates, dict[str, str]]:
    """The built-in rates with each file's rates laid over them in order, and every rate's source;
    UsageError (one line, naming the fix) for an unreadable file or a bad value."""
    rates, sources = Rates(), built_in_sources()
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            rates, sources = parse_rates(data, rates, sources, str(path))
        except (OSError, ValueError, TypeError) as err:
            first = str(err).splitlines()[0] if str(err) else ""
            raise UsageError(f"--rates {path} is not a rates JSON written by --calibrate ({type(err).__name__}: "
                             f"{first}); rerun --calibrate --out {path}") from None
    return rates, sources


def read_rates(path: Path | None) -> Rates:
    """Rates from one rates JSON file (rates it lacks keep their built-in values), else the built-in ones."""
    return read_rates_files([path] if path is not None else [])[0]


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


def write_rates(out: Path | None, rates: Rates, sources: dict[str, str]) -> str:
    text = rates_json(rates, sources)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    return text


def run_calibration(args: argparse.Namespace) -> int:
    from precompute.plan.calibrate import calibrate

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        rates, sources, run = calibrate(Path(args.calibration_dir or tmp), args.calibration_config)
        wall = time.time() - t0
    text = write_rates(args.out, rates, sources)
    print(f"rates measured on this machine in {wall:.0f} s with {args.calibration_config} grown to every stage "
          f"(per core or per worker; GPU rates and the rates no stage of that run depends on keep their built-in "
          f"values, marked assumed):\n{text}")
    print("the calibration run, plan / measured after the fit: " + fit_errors([run], rates)[0])
    return 0


def run_fit(args: argparse.Namespace) -> int:
    rates, sources = read_rates_files(args.rates)
    try:
        runs = [read_run(p) for p in args.rates_from_run]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--rates-from-run: a run directory without a readable stages.json, run_config.json and "
                         f"token files ({type(err).__name__}: {err}); give built run directories") from None
    fitted, sources = fit_to_runs(rates, sources, runs)
    text = write_rates(args.out, fitted, sources)
    print(f"rates fitted to the stage seconds of {len(runs)} run(s):\n{text}")
    print("plan / measured per stage after the fit:\n" + "\n".join(fit_errors(runs, fitted)))
    return 0


def plan(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if (args.calibrate or args.rates_from_run) and args.out is not None and not Path(args.out).parent.is_dir():
        raise UsageError(f"--out {args.out}: its folder does not exist")
    if args.calibrate:
        return run_calibration(args)
    if args.rates_from_run:
        return run_fit(args)
    if args.config is None:
        raise UsageError("--config is required (or --calibrate, or --rates-from-run)")
    cfg = load_config(args.config, {"model": args.model}, {"model": "--model"})
    rates, sources = read_rates_files(args.rates)
    measured = read_measured(args.measured)
    machine = Machine(args.gpus, args.cpus, args.nodes or max(1, math.ceil(args.gpus / 8)), args.executor,
                      args.faiss_gpu)
    facts = run_facts(cfg, args.entries, args.eval_positions)
    runs, reason = decide_exact(cfg, facts, machine)
    print(report(cfg, facts, estimate(cfg, facts, rates, machine, exact_runs=runs), machine, reason, measured,
                 rates, sources))
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
