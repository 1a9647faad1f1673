"""CLI: `python -m precompute --config PATH --run-dir DIR [overrides]` builds (or resumes) a run.

Errors a user can fix are printed as one line `error: ...` with exit code 2; the run
directory is left as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from knnlm_core.config import ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m precompute",
        description="Build a kNN-LM long-tail run: datastore keys, FAISS index, kNN-LM scores and "
        "per-token metrics in DIR/metrics.duckdb (SPEC §7). Rerunning resumes; finished stages are skipped.",
    )
    parser.add_argument("--config", type=Path, required=True, help="TOML preset (see configs/)")
    parser.add_argument("--run-dir", type=Path, required=True, help="directory of the run (created if absent)")
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
    over = parser.add_argument_group("config overrides")
    over.add_argument("--model", help="hub name (e.g. gpt2-xl) or local model directory")
    over.add_argument("--k", type=int, help="neighbours used for p_kNN")
    over.add_argument("--nprobe", type=int, help="inverted lists visited per query")
    over.add_argument("--temperature", type=float, help="softmax temperature τ on distances")
    over.add_argument("--lambda", dest="lam", type=float, help="interpolation weight λ")
    over.add_argument("--distance-source", choices=["pq", "exact"], help="distances used for p_kNN")
    over.add_argument("--index-factory", help="faiss index_factory string, e.g. IVF4096,PQ64")
    over.add_argument("--eval-corpus", help="evaluation text file")
    over.add_argument("--eval-limit-tokens", type=int, help="evaluate only the first N tokens")
    over.add_argument("--store-neighbors", type=int, help="neighbours per position kept in DuckDB")
    over.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto: cuda when a GPU is visible")
    over.add_argument("--shard-size", type=int, help="keys / positions / queries per shard (resume unit)")
    over.add_argument("--threads", type=int)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Every other flag is a RunConfig field (dest names match; None = not given).
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "run_dir", "overwrite", "run_name", "executor", "ray_address")}
    # Imported here so that --help stays fast (the pipeline imports torch and faiss).
    from knnlm_core.corpus import CorpusError
    from knnlm_core.index import IndexConfigError
    from knnlm_core.keystore import KeyStoreError
    from knnlm_core.model import ModelError
    from precompute.executor import make_executor
    from precompute.pipeline import RunError, build_run

    executor = None
    try:
        cfg = load_config(args.config, overrides)
        executor = make_executor(args.executor, args.ray_address)
        build_run(cfg, args.run_dir, overwrite=args.overwrite, run_name=args.run_name, executor=executor)
    except (ConfigError, CorpusError, IndexConfigError, KeyStoreError, ModelError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished stages are kept)", file=sys.stderr)
        return 130
    finally:
        if executor is not None:
            executor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
