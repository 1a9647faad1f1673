"""Benchmark: SPEC §11 interval cost in the app (goal: <= 0.3 s warm for B = 1,000 per-bin table).

Times `read.bins.bin_summary` (the Frequency bins / Overview table: SQL aggregates plus the
per-document sums and the bootstrap of 15 figures) and the bootstrap alone, cold (first call on
a fresh connection) and warm (repeated), side by side with the same table without intervals, on
1. the shipped demo run (20k positions, 5 articles), and
2. a database of the full WikiText-2 test's shape: 286,220 positions with their real documents
   (the 62 articles found by knnlm_core.documents in wiki.test.raw with the GPT-2 tokenizer) and
   their real frequency bins (GPT-2 token counts of WikiText-2 train); the NLL / p / hit columns
   are seeded random values, because that run is not shipped (timing does not depend on them).

    python bench/bootstrap.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.common import DefaultsHelp  # noqa: E402
from knnlm_core import bootstrap as bs  # noqa: E402
from knnlm_core import documents, read, store  # noqa: E402
from knnlm_core.bins import freq_bin  # noqa: E402
from knnlm_core.corpus import load_tokenizer, read_text, tokenize_text  # noqa: E402

TOKENIZER = REPO_ROOT / "data" / "models" / "demo-gpt2"


def full_test_shape(path: Path, seed: int = 0) -> Path:
    """A metrics.duckdb with the WikiText-2 test's positions, documents and bins (see the module doc)."""
    tok = load_tokenizer(str(TOKENIZER))
    text = read_text(REPO_ROOT / "data/corpora/wikitext2-test.raw.gz")
    ids = tokenize_text(text, tok)
    docs = documents.for_eval_tokens(text, tok, ids, 2048)
    train = tokenize_text(read_text(REPO_ROOT / "data/corpora/wikitext2-train.tokens.gz"), tok)
    freq = np.bincount(train[1:], minlength=len(tok))
    t = len(ids) - 1
    rng = np.random.default_rng(seed)
    p_lm = rng.beta(0.5, 3.0, t).clip(1e-9)
    p_knn = np.where(rng.random(t) < 0.3, 0.0, rng.beta(0.5, 3.0, t))
    p_knnlm = 0.25 * p_knn + 0.75 * p_lm
    ev = pd.DataFrame({"pos": np.arange(t, dtype=np.int32), "doc_id": docs.doc_id, "token_id": ids[1:],
                       "freq_bin": freq_bin(freq[ids[1:]]).astype(np.int16), "p_lm": p_lm, "p_knn": p_knn,
                       "nll_lm": -np.log(p_lm), "nll_knnlm": -np.log(p_knnlm), "gain": np.log(p_knnlm / p_lm),
                       "n_target": rng.integers(0, 50, t)})
    for k in store.HIT_KS:
        ev[f"hit_{k}"] = rng.random(t) < 0.1 + 0.1 * np.log2(k) / 10
    for c in ("query_pq_error", "context_freq"):
        ev[c] = 0.0
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE eval_tokens AS SELECT * FROM ev ORDER BY pos")
    con.execute("CREATE TABLE token_types AS SELECT 0 AS token_id, 0 AS freq, 0 AS freq_bin, 0.0 AS cv, "
                "0.0 AS contamination, 0.0 AS pq_error_mean WHERE FALSE")
    con.execute(f"CREATE TABLE run AS SELECT {len(docs.first_pos)} AS n_docs, 0.25 AS \"lambda\"")
    con.close()
    return path


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """(best wall seconds over `repeat` calls, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(name: str, path: Path, run_k: int) -> None:
    con = duckdb.connect(str(path), read_only=True)
    cur = con.cursor()
    ks = read.run.hit_ks_for(run_k)
    cold, table = timed(lambda: read.bins.bin_summary(cur, run_k))
    warm, _ = timed(lambda: read.bins.bin_summary(cur, run_k), repeat=5)
    frame = read.ci.doc_sums(cur, {**read.bins.TOKEN_SUMS, **{f"hit_{k}": f"hit_{k}::INTEGER" for k in ks},
                                     "nontarget": f"1 - n_target / {float(run_k)!r}"})
    n_docs = read.ci.n_docs(cur)
    sums_s, _ = timed(lambda: read.ci.doc_sums(cur, read.bins.TOKEN_SUMS), repeat=5)
    boot_s, _ = timed(lambda: bs.intervals(frame, read.bins.token_figures(ks), n_docs), repeat=5)
    plain_sql = "SELECT freq_bin, count(*), exp(avg(nll_lm)), exp(avg(nll_knnlm)) FROM eval_tokens GROUP BY freq_bin"
    plain_s, _ = timed(lambda: cur.execute(plain_sql).fetchdf(), repeat=5)
    n_tok = cur.execute("SELECT count(*) FROM eval_tokens").fetchone()[0]
    con.close()
    print(f"{name}: {n_tok:,} positions, {n_docs} documents, {len(table)} bins, B = {bs.N_BOOT:,}")
    print(f"  bin_summary with intervals: cold {cold:.3f} s, warm {warm:.3f} s (goal <= 0.3 s warm)")
    print(f"    per-document SQL sums {sums_s:.3f} s, bootstrap of {len(read.bins.token_figures(ks))} figures "
          f"{boot_s:.4f} s; plain per-bin SQL without intervals {plain_s:.3f} s")
    print(f"  ratio warm / goal: {warm / 0.3:.2f}x of the 0.3 s budget")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelp)
    parser.parse_args(argv)
    measure("demo (shipped)", REPO_ROOT / "data/runs/demo/metrics.duckdb", 1024)
    with tempfile.TemporaryDirectory() as tmp:
        measure("WikiText-2 test shape", full_test_shape(Path(tmp) / "wt2.duckdb"), 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
