"""Benchmark: key extraction rate of the datastore stage vs a plain HF loop and the bare body forward.

All four sides run the same model over the same corpus slice with the same sliding windows
(`plan_windows`; window length and stride resolved as the pipeline does), in one process:

* stage     -- the datastore stage itself (`stage_datastore` on a scratch run over the slice:
  shards of `--shard-size` keys, each written under a temporary name and renamed, values,
  shard list), as `python -m precompute` runs it.
* pipeline  -- `precompute.extract.extract`, the stage's extraction alone: windows batched,
  the forward stopped at the last block's FFN input (no last FFN, no LM head), fp16 keys
  written to an on-disk memmap; on CPU `--threads` batches at once, one per thread; on CUDA
  through pinned buffers, non-blocking copies and a writer thread that overlap the next batch.
* baseline  -- the naive way: one window per call, `model(input_ids, output_hidden_states=True)`
  with the LM head, `hidden_states[-1]` of the owned positions copied synchronously.
* bare      -- the batched body forward alone on the same batches and threads (no hook, no
  copy, no write): the ceiling the pipeline can approach.

The process runs under the pipeline's allocator policy (`runner.return_freed_memory`, as
`build_run` sets it), every side's forward passes inside `heap_allocations` as the model
stages run theirs. Each side is warmed up once, then timed `--repeats` times interleaved;
the best time of each is reported as keys/second with the ratios stage / pipeline (what the
stage costs around its extraction), pipeline / baseline (goal >= 2.5x on a GPU) and
pipeline / bare (goal >= 85%).

    python bench/extract.py                                   # demo model, 20k tokens, CPU
    python bench/extract.py --device cuda --shape gpt2-xl --dtype bfloat16 --batch-size 32 --tokens 262144
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # the pipeline's progress bar would only add noise here

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import BenchParser, DefaultsHelp, count, size  # noqa: E402
from knnlm_core.config import RunConfig, resolve_path  # noqa: E402
from knnlm_core.corpus import load_tokenizer, tokenize_file  # noqa: E402
from knnlm_core.keystore import open_keys  # noqa: E402
from knnlm_core.model import batch_windows, load_model, wrap_model  # noqa: E402
from knnlm_core.windows import plan_windows  # noqa: E402
from precompute.extract import batch_workers, extract, heap_allocations  # noqa: E402
from precompute.pipeline import resolve_windows  # noqa: E402
from precompute.runner import Run, return_freed_memory, save_npy  # noqa: E402
from precompute.stages.datastore import stage_datastore  # noqa: E402

DEFAULT_MODEL = "data/models/demo-gpt2"
FALLBACK_TOKENIZER = "data/models/demo-gpt2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="HF model directory (relative paths resolve against the repo root); when the default "
        "demo model is missing, a tiny random GPT-2 (4 x 192) is used instead",
    )
    p.add_argument(
        "--tokenizer",
        default="",
        help=f"tokenizer directory; '' = the model folder if it has tokenizer files, else {FALLBACK_TOKENIZER}",
    )
    p.add_argument("--corpus", default="data/corpora/wikitext2-valid.raw.gz", help="corpus file (.gz ok)")
    p.add_argument("--tokens", type=count, default=20000, help="first N tokens of the corpus")
    p.add_argument("--max-context", type=size, default=0, help="window length; 0 = n_positions capped at 1024")
    p.add_argument("--stride", type=size, default=0, help="window stride; 0 = max_context // 2")
    p.add_argument("--batch-size", type=count, default=8, help="windows per forward pass (pipeline side)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="forward-pass dtype (both sides)"
    )
    p.add_argument("--threads", type=count, default=2, help="CPU threads (the run's `threads`)")
    p.add_argument("--shard-size", type=count, default=RunConfig().shard_size, help="keys per shard (stage side)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="", choices=["", "gpt2-xl", "gpt2-large", "gpt2"],
                   help="build a RANDOM-weight GPT-2 of this shape (no download) instead of --model")
    p.add_argument("--repeats", type=count, default=2, help="timed runs per side (best is reported)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


SHAPES = {"gpt2-xl": (48, 1600, 25), "gpt2-large": (36, 1280, 20), "gpt2": (12, 768, 12)}  # layers, d, heads


def build_model(args: argparse.Namespace):
    """(LoadedModel, tokenizer directory, description)."""
    if args.shape:
        from transformers import GPT2Config, GPT2LMHeadModel

        n_layer, n_embd, n_head = SHAPES[args.shape]
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
        dtype = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)[args.dtype]
        with torch.device(args.device):
            model = GPT2LMHeadModel(config).to(dtype)
        return wrap_model(model), FALLBACK_TOKENIZER, f"random-weight {args.shape} shape ({n_layer} x {n_embd})"
    model_dir = resolve_path(args.model)
    if model_dir.is_dir():
        lm = load_model(str(model_dir), args.dtype, args.device)
        tok = args.tokenizer or (
            str(model_dir)
            if any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
            else FALLBACK_TOKENIZER
        )
        return lm, tok, f"{model_dir}"
    if args.model != DEFAULT_MODEL:
        sys.exit(f"error: model directory {model_dir} not found")
    print(
        f"note: {model_dir} does not exist yet (demo model not trained); using a tiny RANDOM GPT-2 "
        "(4 layers x 192 hidden, 6 heads, n_positions 512, GPT-2 vocabulary) instead",
        flush=True,
    )
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = args.tokenizer or FALLBACK_TOKENIZER
    vocab = len(load_tokenizer(str(resolve_path(tok))))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=192, n_layer=4, n_head=6)
    model = GPT2LMHeadModel(config).to(
        dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)[args.dtype]
    ).to(args.device)
    return wrap_model(model), tok, "random GPT-2 4x192 (fallback)"


def scratch_run(lm, ids: np.ndarray, args: argparse.Namespace, max_context: int, stride: int) -> Run:
    """A run directory holding only the slice's token ids, for the stage side (model already loaded)."""
    cfg = replace(RunConfig(), batch_size=args.batch_size, threads=args.threads, shard_size=args.shard_size)
    run = Run(cfg=cfg, run_dir=Path(tempfile.mkdtemp()), run_name="bench-extract", _lm=lm,
              info={"max_context": max_context, "stride": stride, "dim": lm.dim, "device": args.device})
    save_npy(run.path("datastore_ids.npy"), ids)
    return run


def run_stage(run: Run) -> np.ndarray:
    """The datastore stage from scratch (its shards of an earlier call removed first)."""
    shutil.rmtree(run.path("keys"), ignore_errors=True)
    stage_datastore(run, "bench")
    return open_keys(run.run_dir)


def run_pipeline(lm, ids: np.ndarray, windows, batch_size: int, threads: int, out_path: Path) -> np.ndarray:
    """The stage's extraction alone into an on-disk fp16 (n-1, d) memmap, as the stage writes it."""
    keys = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float16, shape=(len(ids) - 1, lm.dim))
    with heap_allocations():
        extract(lm, ids, windows, keys, batch_size, threads=threads)
    keys.flush()
    return keys


def sync(lm) -> None:
    if next(lm.model.parameters()).is_cuda:
        torch.cuda.synchronize()


def run_bare(lm, ids: np.ndarray, windows, batch_size: int, threads: int) -> None:
    """The batched body forward alone (no hook, no copy), batches spread over threads as in the
    pipeline: the ceiling for the pipeline."""
    model = lm.model
    body = getattr(model, model.base_model_prefix)
    device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(batch) -> None:
        x = torch.from_numpy(np.stack([ids[w.begin : w.end] for w in batch]).astype(np.int64)).to(device)
        body(input_ids=x, use_cache=False)

    with heap_allocations(), (batch_workers(threads) if device.type == "cpu" else nullcontext()) as pool:
        list((pool.map if pool else map)(forward, batch_windows(windows, batch_size)))
    sync(lm)


def run_baseline(lm, ids: np.ndarray, windows, n_out: int) -> np.ndarray:
    """Naive HF loop: one window per call, full LM head, hidden_states[-1] of the owned positions."""
    model = lm.model
    device = next(model.parameters()).device
    keys = np.empty((n_out, lm.dim), dtype=np.float16)
    with torch.no_grad(), heap_allocations():
        for w in windows:
            input_ids = torch.tensor(ids[w.begin : w.end], dtype=torch.long, device=device)[None]  # (1, L)
            out = model(input_ids, output_hidden_states=True)  # logits (1, L, V) computed too
            lo, hi = w.first_pos - w.begin, w.end - 1 - w.begin
            keys[w.first_pos : w.end - 1] = out.hidden_states[-1][0, lo:hi].float().cpu().numpy()
    return keys


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    return_freed_memory()  # the allocator policy build_run gives the pipeline's process
    torch.set_num_threads(args.threads)
    lm, tok_dir, model_desc = build_model(args)
    tokenizer = load_tokenizer(str(resolve_path(tok_dir)))
    ids = tokenize_file(resolve_path(args.corpus), tokenizer, args.tokens)
    vocab = lm.model.get_input_embeddings().num_embeddings
    if ids.max() >= vocab:
        sys.exit(f"error: corpus token id {ids.max()} >= model vocabulary {vocab} (tokenizer/model mismatch)")
    max_context, stride = resolve_windows(RunConfig(max_context=args.max_context, stride=args.stride), lm.n_positions)
    windows = plan_windows(len(ids), max_context, stride)
    n_keys = len(ids) - 1
    n_forward = sum(w.end - w.begin for w in windows)
    print(f"model: {model_desc} ({lm.model_type}, d={lm.dim}, dtype={args.dtype}), hook {lm.hook_point}")
    print(
        f"corpus: {args.corpus}, {len(ids):,} tokens -> {n_keys:,} keys; {len(windows)} windows of "
        f"max_context {max_context}, stride {stride} ({n_forward:,} token-forwards); batch {args.batch_size}, "
        f"threads {args.threads}, shards of {args.shard_size:,} keys (stage side)",
        flush=True,
    )

    run = scratch_run(lm, ids, args, max_context, stride)
    out_path = run.path("pipeline_keys.npy")
    warm = windows[: min(len(windows), 2 * args.batch_size)]
    run_pipeline(lm, ids, warm, args.batch_size, args.threads, out_path)
    run_bare(lm, ids, warm, args.batch_size, args.threads)
    run_baseline(lm, ids, windows[:1], n_keys)
    sides = {
        "stage": lambda: run_stage(run),
        "pipeline": lambda: run_pipeline(lm, ids, windows, args.batch_size, args.threads, out_path),
        "bare": lambda: run_bare(lm, ids, windows, args.batch_size, args.threads),
        "baseline": lambda: run_baseline(lm, ids, windows, n_keys),
    }
    best = dict.fromkeys(sides, float("inf"))
    for rep in range(args.repeats):
        for name, side in sides.items():
            t0 = time.perf_counter()
            keys = side()
            sync(lm)
            dt = time.perf_counter() - t0
            if keys is not None and not np.isfinite(keys[:: max(1, n_keys // 1000)].astype(np.float32)).all():
                sys.exit(f"error: {name} produced non-finite keys")
            if name == "stage" and rep and not np.array_equal(keys[:], np.load(out_path, mmap_mode="r")):
                sys.exit("error: the stage's keys differ from the extraction's")  # vs the last pipeline side
            best[name] = min(best[name], dt)
            print(f"  run {rep + 1} {name:8s}: {dt:7.2f} s  {n_keys / dt:10,.0f} keys/s", flush=True)

    shutil.rmtree(run.run_dir)
    rate = {name: n_keys / t for name, t in best.items()}
    print(f"stage (datastore stage: shards, renames, values, shard list):   {rate['stage']:10,.0f} keys/s")
    print(f"pipeline (batched, stops at the FFN input, fp16 memmap write): {rate['pipeline']:10,.0f} keys/s")
    print(f"bare body forward (same batches, no hook, no copy):           {rate['bare']:10,.0f} keys/s "
          f"({rate['bare'] * n_forward / n_keys:,.0f} tokens/s)")
    print(f"baseline (HF loop, 1 window/call, output_hidden_states):      {rate['baseline']:10,.0f} keys/s")
    print(f"ratio stage / pipeline:    {rate['stage'] / rate['pipeline']:.0%} (what the stage costs around it)")
    print(f"ratio pipeline / baseline: {rate['pipeline'] / rate['baseline']:.2f}x (goal >= 2.5x)")
    print(f"ratio pipeline / bare:     {rate['pipeline'] / rate['bare']:.0%} (goal >= 85%)")


if __name__ == "__main__":
    main()
