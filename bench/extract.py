"""Benchmark: key extraction rate of the precompute pipeline vs a plain Hugging Face loop.

Both sides run the same model on the same corpus slice with the same sliding windows
(`plan_windows`, window length / stride resolved exactly as the pipeline does) and write
one fp16 key per scored position into an (n - 1, d) array:

* pipeline  -- `precompute.pipeline.extract`, i.e. the datastore stage's code path:
  `plan_windows` + `batch_windows` + `forward_windows(with_logits=False)` (windows batched,
  transformer body only, key captured by a pre-hook on the last block's MLP).
* baseline  -- the naive way: one window at a time, `model(input_ids,
  output_hidden_states=True)` under `torch.no_grad()` with the full LM head computed,
  taking `hidden_states[-1]` for the owned positions. (That is the last block's output, not
  the MLP input the pipeline keys on; the work per position is equivalent.)

Each side is warmed up once (first window batch), then timed twice, interleaved
(pipeline, baseline, pipeline, baseline), and the best time of each is reported as
keys/second. The goal is pipeline / baseline >= 2x.

If the demo model (data/models/demo-gpt2) has not been trained yet, a tiny random GPT-2
(4 layers x 192 hidden, 6 heads, n_positions 512, GPT-2 vocabulary) is built instead so
the script always runs; the rates then describe that architecture, not trained weights.

    python bench/extract.py                       # 20k tokens of WikiText-2 valid
    python bench/extract.py --tokens 2000 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # the pipeline's progress bar would only add noise here

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import DefaultsHelp  # noqa: E402
from knnlm_core.config import RunConfig, resolve_path  # noqa: E402
from knnlm_core.corpus import load_tokenizer, tokenize_file  # noqa: E402
from knnlm_core.model import load_model, wrap_model  # noqa: E402
from knnlm_core.windows import plan_windows  # noqa: E402
from precompute.pipeline import Run, extract, resolve_windows  # noqa: E402

DEFAULT_MODEL = "data/models/demo-gpt2"
FALLBACK_TOKENIZER = "data/tokenizers/gpt2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
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
    p.add_argument("--tokens", type=int, default=20000, help="first N tokens of the corpus")
    p.add_argument("--max-context", type=int, default=0, help="window length; 0 = n_positions capped at 1024")
    p.add_argument("--stride", type=int, default=0, help="window stride; 0 = max_context // 2")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (pipeline side)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="forward-pass dtype (both sides)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side (best is reported)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def build_model(args: argparse.Namespace):
    """(LoadedModel, tokenizer directory, description)."""
    model_dir = resolve_path(args.model)
    if model_dir.is_dir():
        lm = load_model(str(model_dir), args.dtype)
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
    )
    return wrap_model(model), tok, "random GPT-2 4x192 (fallback)"


def run_pipeline(lm, ids: np.ndarray, max_context: int, stride: int, batch_size: int) -> np.ndarray:
    """The datastore stage's extraction (precompute.pipeline.extract) into an fp16 (n-1, d) array."""
    run = Run(cfg=RunConfig(batch_size=batch_size), run_dir=Path("."), run_name="bench")
    run._lm = lm  # Run.lm would otherwise load cfg.model
    run.info.update(max_context=max_context, stride=stride)
    keys = np.empty((len(ids) - 1, lm.dim), dtype=np.float16)
    extract(run, ids, keys, "pipeline")
    return keys


def run_baseline(lm, ids: np.ndarray, windows, n_out: int) -> np.ndarray:
    """Naive HF loop: one window per call, full LM head, hidden_states[-1] of the owned positions."""
    model = lm.model
    device = next(model.parameters()).device
    keys = np.empty((n_out, lm.dim), dtype=np.float16)
    with torch.no_grad():
        for w in windows:
            input_ids = torch.tensor(ids[w.begin : w.end], dtype=torch.long, device=device)[None]  # (1, L)
            out = model(input_ids, output_hidden_states=True)  # logits (1, L, V) computed too
            lo, hi = w.first_pos - w.begin, w.end - 1 - w.begin
            keys[w.first_pos : w.end - 1] = out.hidden_states[-1][0, lo:hi].float().cpu().numpy()
    return keys


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
        f"threads {args.threads}",
        flush=True,
    )

    # warm-up: first batch of windows each
    warm_end = windows[min(len(windows), args.batch_size) - 1].end
    run_pipeline(lm, ids[:warm_end], max_context, stride, args.batch_size)
    run_baseline(lm, ids, windows[:1], n_keys)

    best = {"pipeline": float("inf"), "baseline": float("inf")}
    for rep in range(args.repeats):
        for name in ("pipeline", "baseline"):
            t0 = time.perf_counter()
            keys = (
                run_pipeline(lm, ids, max_context, stride, args.batch_size)
                if name == "pipeline"
                else run_baseline(lm, ids, windows, n_keys)
            )
            dt = time.perf_counter() - t0
            if not np.isfinite(keys.astype(np.float32)).all():
                sys.exit(f"error: {name} produced non-finite keys")
            best[name] = min(best[name], dt)
            print(f"  run {rep + 1} {name:8s}: {dt:7.2f} s  {n_keys / dt:10,.0f} keys/s", flush=True)

    rate_p, rate_b = n_keys / best["pipeline"], n_keys / best["baseline"]
    print(f"pipeline (batched body, no LM head, MLP-input hook): {rate_p:10,.0f} keys/s")
    print(f"baseline (HF loop, 1 window/call, output_hidden_states): {rate_b:10,.0f} keys/s")
    print(f"ratio: {rate_p / rate_b:.1f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
