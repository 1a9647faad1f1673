"""CLI: `python -m precompute --config PATH --run-dir DIR [overrides]` builds (or resumes) a run.

Errors a user can fix are printed as one line `error: ...` with exit code 2, found before
torch or faiss is imported and before anything is written (`precompute.preflight`); an
unexpected error exits 1 with one line and the path of a log holding its traceback. A run whose
metrics.duckdb is garbled (a damaged block) is refused the same way, untouched; with --overwrite
the garbled file is kept aside and the database stage rebuilds it (temp file + rename).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from knnlm_core.config import load_config
from precompute.cli import Parser, float_arg, int_in, path_arg, run_cli, say

CLI_ONLY = ("config", "run_dir", "overwrite", "run_name", "executor", "ray_address")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m precompute",
        description="Build a kNN-LM long-tail run: datastore keys, FAISS index, kNN-LM scores and "
        "per-token metrics in DIR/metrics.duckdb (SPEC §7). Rerunning resumes; finished stages are skipped.",
    )
    parser.add_argument("--config", type=path_arg, required=True, help="TOML preset (see configs/)")
    parser.add_argument("--run-dir", type=path_arg, required=True, help="directory of the run (created if absent)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run built with another config (stages whose inputs did not change are reused)")
    parser.add_argument("--run-name", help="name shown in the dashboard (default: the directory name)")
    # Execution flags, not config fields: they enter no stage key, so either executor resumes the other's run.
    run = parser.add_argument_group("execution (docs/SCALE.md)")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: this process (default); ray: shard maps on Ray actors (pip install -r "
                     "requirements-ray.txt)")
    run.add_argument("--ray-address", help="join a running Ray cluster ('auto' or host:port); default: start a "
                     "local Ray instance")
    # Ranges are the config schema's (knnlm_core.config.RULES): a flag and a TOML value are checked alike.
    over = parser.add_argument_group("config overrides")
    over.add_argument("--model", help="hub name (e.g. gpt2-xl) or local model directory")
    over.add_argument("--k", type=int_in(), help="neighbours used for p_kNN")
    over.add_argument("--nprobe", type=int_in(), help="inverted lists visited per query")
    over.add_argument("--temperature", type=float_arg, help="softmax temperature τ on distances")
    over.add_argument("--lambda", dest="lam", type=float_arg, help="interpolation weight λ")
    over.add_argument("--distance-source", choices=["pq", "exact"], help="distances used for p_kNN")
    over.add_argument("--index-factory", help="faiss index_factory string, e.g. IVF4096,PQ64")
    over.add_argument("--eval-corpus", help="evaluation text file")
    over.add_argument("--eval-limit-tokens", type=int_in(), help="evaluate only the first N tokens")
    over.add_argument("--import-datastore", help='"knn-transformers:DIR": check and use that datastore (and its '
                      "index) instead of extracting; datastore_corpus names the text that built it (docs/IMPORT.md)")
    over.add_argument("--store-neighbors", type=int_in(), help="neighbours per position kept in DuckDB")
    over.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto: cuda when a GPU is visible")
    over.add_argument("--shard-size", type=int_in(), help="keys / positions / queries per shard (resume unit)")
    over.add_argument("--threads", type=int_in())
    return parser.parse_args(argv)


def flag_names(args: argparse.Namespace) -> dict[str, str]:
    """Config field -> the CLI flag that sets it (error messages name what the user typed)."""
    return {k: "--" + ("lambda" if k == "lam" else k.replace("_", "-")) for k in vars(args) if k not in CLI_ONLY}


def set_aside_garbled(run_dir: Path, config: Path, overwrite: bool) -> None:
    """Refuse a run whose metrics.duckdb is garbled (CorruptRunError: exit 2, nothing written); with
    --overwrite keep it as metrics.duckdb.garbled, so the database stage sees no output and rebuilds it.

    Needed because the stage runner's check of a finished database counts rows, which DuckDB answers
    from metadata without reading (or checksumming) the data blocks: a rerun would trust a garbled file.
    """
    from knnlm_core import store

    db = Path(run_dir) / store.DB_NAME
    if not db.is_file():
        return
    try:
        store.check_file(db, config=str(config))
    except store.CorruptRunError:
        if not overwrite:
            raise
        aside = db.with_name(db.name + ".garbled")
        os.replace(db, aside)
        say(f"{db} is garbled: kept as {aside.name}; the database stage rebuilds it")


def build(argv: list[str] | None) -> int:
    """Validate everything cheap first (no torch / faiss import), then build the run."""
    args = parse_args(argv)
    # Every other flag is a RunConfig field (dest names match; None = not given).
    overrides = {k: v for k, v in vars(args).items() if k not in CLI_ONLY}
    cfg = load_config(args.config, overrides, flag_names(args))
    from precompute.preflight import preflight

    preflight(cfg, args.run_dir, args.overwrite)
    set_aside_garbled(args.run_dir, args.config, args.overwrite)
    # Imported only now: the pipeline imports torch and faiss (seconds), which bad input never waits for.
    from precompute.executor import make_executor
    from precompute.pipeline import build_run

    executor = make_executor(args.executor, args.ray_address)
    try:
        build_run(cfg, args.run_dir, overwrite=args.overwrite, run_name=args.run_name, executor=executor)
    finally:
        executor.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: build(argv), "precompute")


if __name__ == "__main__":
    sys.exit(main())
