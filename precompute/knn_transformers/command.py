"""The command line: `python -m precompute.knn_transformers check|export ...`; exit 2 with one line on bad input.

`check --dir DIR --model M --corpus C [--sample N]` runs `check_datastore` and prints what it found;
`export --run-dir R --out DIR` runs `export_run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .check import check_datastore
from .export import export_run
from .format import DatastoreError, check_file_sizes, find_datastore


def load_inputs(model: str, tokenizer: str, corpus: str, limit: int, dtype: str, device: str):
    """(LoadedModel, tokenizer length, token stream of the corpus) with the project's loaders."""
    from knnlm_core.corpus import load_tokenizer, tokenize_file
    from knnlm_core.model import load_model

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(tokenizer or model)
    stream = tokenize_file(Path(corpus), tok, limit or None)
    return load_model(model, dtype, device), len(tok), stream


def cmd_check(args: argparse.Namespace) -> int:
    ds = find_datastore(Path(args.dir), args.size)
    check_file_sizes(ds)  # before loading a model: a wrong file costs nothing
    lm, vocab, stream = load_inputs(args.model, args.tokenizer, args.corpus, args.limit_tokens, args.dtype,
                                    args.device)
    report, _ = check_datastore(ds, lm, vocab, stream, args.corpus, args.sample, args.max_context, args.stride,
                                args.seed, args.nprobe)
    k = report.keys
    print(f"ok: {ds.prefix()} ({report.size:,} x {report.dim}, keys {'present' if report.has_keys else 'absent'}, "
          f"index {', '.join(report.index_files) or 'absent'}) belongs to {args.model} over {args.corpus}")
    print(f"alignment: {report.rule}")
    print(f"keys: {k['method']}, {k['share_ok']:.0%} of {k['sample']} rows pass ({k['criterion']}; median "
          f"{k['median']:.3g}, worst {k['worst']:.3g})")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    info = export_run(Path(args.run_dir), Path(args.out), args.nlist, args.m)
    print(f"exported {info['size']:,} x {info['dim']} to {info['out']}; index: {info['index']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m precompute.knn_transformers", description=sys.modules[__package__].__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check that a knn-transformers datastore belongs to a model and a text")
    c.add_argument("--dir", required=True, help="folder with dstore_<type>_<size>_<dim>_{keys,vals}.npy")
    c.add_argument("--model", required=True, help="hub name or local directory of the model")
    c.add_argument("--corpus", required=True, help="the text that built the datastore (project corpus file)")
    c.add_argument("--tokenizer", default="", help="tokenizer; default: the model's")
    c.add_argument("--size", type=int, default=None, help="which datastore when the folder holds several")
    c.add_argument("--limit-tokens", type=int, default=0, help="tokenize only the first N tokens (0 = all)")
    c.add_argument("--sample", type=int, default=64, help="rows whose keys are recomputed")
    c.add_argument("--max-context", type=int, default=0, help="window length (0 = model's, capped at 1024)")
    c.add_argument("--stride", type=int, default=0, help="window stride (0 = max-context // 2)")
    c.add_argument("--nprobe", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c.add_argument("--json", default="", help="also write the report to this JSON file")
    c.set_defaults(func=cmd_check)
    e = sub.add_parser("export", help="write a run's datastore and index in knn-transformers' format")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--out", required=True, help="new (or empty) folder to create")
    e.add_argument("--nlist", type=int, default=4096, help="IVF lists when the run's index must be rebuilt")
    e.add_argument("--m", type=int, default=64, help="PQ sub-quantizers when the run's index must be rebuilt")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from knnlm_core.corpus import CorpusError
    from knnlm_core.keystore import KeyStoreError
    from knnlm_core.model import ModelError

    try:
        return args.func(args)
    except (DatastoreError, CorpusError, KeyStoreError, ModelError, OSError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
