"""The command line of `python -m precompute.verify`: arguments, the run's files, one line per check.

Exit codes (precompute.cli): 0 every check passed, 1 a check failed (or an internal error: one line and a
log), 2 bad input (a missing, truncated or damaged file; one `error:` line naming it and the fix).
"""

from __future__ import annotations

from pathlib import Path

DESCRIPTION = "Independent recomputation of a run's stored columns from the run's own files (SPEC §2-§5, §7)."

RUN_FILES = ("values.npy", "queries.npy", "index.faiss", "eval_ids.npy", "datastore_ids.npy", "manifest.json",
             "metrics.duckdb")


def check_run_files(run_dir: Path) -> None:
    """UsageError naming the fix when the run lacks a file verify reads, or holds a truncated / corrupt one."""
    from precompute.cli import UsageError
    from precompute.runner import artifact_problem

    if not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is not a directory (give a built run's directory)")
    if not (run_dir / "metrics.duckdb").exists():
        raise UsageError(f"no metrics.duckdb in {run_dir} (build the run first)")
    has_keys = (run_dir / "keys.npy").exists() or (run_dir / "keys" / "shards.json").exists()
    missing = ([] if has_keys else ["keys.npy or keys/shards.json"]) + [f for f in RUN_FILES
                                                                       if not (run_dir / f).exists()]
    if missing:
        raise UsageError(f"{run_dir} lacks {missing}: rebuild them with `python -m precompute --config ... "
                         f"--run-dir {run_dir}`")
    for name in RUN_FILES:
        if problem := artifact_problem(run_dir / name):
            raise UsageError(f"{run_dir / name} is {problem}: rerun `python -m precompute --config ... --run-dir "
                             f"{run_dir} --overwrite` with the run's config to rebuild it")


def parse_args(argv: list[str] | None):
    from precompute.cli import Parser, int_in, path_arg

    parser = Parser(prog="python -m precompute.verify", description=DESCRIPTION)
    parser.add_argument("--run-dir", type=path_arg, required=True)
    parser.add_argument("--sample", type=int_in(1), default=2000, help="evaluation positions re-searched")
    parser.add_argument("--type-sample", type=int_in(1), default=300, help="token types recomputed")
    parser.add_argument("--exact-sample", type=int_in(1), default=200,
                        help="positions checked by brute-force exact search")
    return parser.parse_args(argv)


def run_checks(argv: list[str] | None) -> int:
    """Check the arguments and the run's files, then every column; 1 when a check fails."""
    from precompute.verify.run import verify_run

    args = parse_args(argv)
    check_run_files(args.run_dir)
    checks = verify_run(args.run_dir, args.sample, args.type_sample, exact_sample=args.exact_sample)
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    failed = sum(not ok for _, ok, _ in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Exit 0 all checks pass, 1 a check failed (or an internal error: one line + log), 2 bad input."""
    from precompute.cli import run_cli

    return run_cli(lambda: run_checks(argv), "verify")
