"""The pipeline's stages, in the order a run executes them: `STAGES` (`precompute.stages.base.Stage`).

The runner (`precompute.pipeline.build_run`) runs every enabled stage of this list in order; the
planner (`precompute.plan`) asks each for its work; `stage_names()` lists them. Each entry says
what it needs, its key fields (what its outputs depend on: a finished stage is reused while its
key is unchanged), its outputs, its run function (`precompute/stages/<x>.py`, imported only when
the stage runs) and its cost. Adding a stage: its module, an entry here (plus its verify check,
tests and docs/ARCHITECTURE.md). This module stays light (numpy and the plan's cost model only):
the planner imports it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from precompute.plan.cost import (
    BLOCK_BYTES_PER_NEIGHBOUR,
    DB_BYTES_PER_POS,
    EXACT_QUERY_BLOCK,
    GPU_KEY_BLOCK,
    TEXT_BYTES_PER_TOKEN,
    Model,
    StageWork,
    busiest,
)
from precompute.stages.base import Keys, Stage

if TYPE_CHECKING:
    from knnlm_core.config import RunConfig
    from precompute.runner import Run

__all__ = ["STAGES", "TAU_GRID", "Stage", "search_blocks", "stage", "stage_names", "tau_grid", "whiten_outputs"]

TAU_GRID = 2.0 ** (np.arange(-8, 57) / 4)  # 0.25 … 16,384, 4 per octave: raw GPT-2 to whitened distance scales


def tau_grid(run_tau: float) -> np.ndarray:
    """TAU_GRID with the run's own τ added: a τ chosen on validation is never worse there than the run's."""
    return np.unique(np.append(TAU_GRID, run_tau))


def search_blocks(cfg: RunConfig) -> list[tuple[str, str]]:
    """(split, index) of every neighbour block the search stage writes, in its order."""
    splits = ["eval", "valid"] if cfg.valid_corpus else ["eval"]
    indexes = ["plain", *cfg.whiten_kinds] if cfg.valid_corpus else ["plain"]
    return [(s, i) for i in indexes for s in splits]


def whiten_outputs(kinds) -> list[str]:
    """The whiten stage's files: per kind its whitening, its index and the index's record."""
    from precompute.stages.whiten import kind_files

    return [f for kind in kinds for f in kind_files(kind)]


def block_listing(split: str, index_name: str) -> str:
    from knnlm_core import neighbours

    return f"{neighbours.ROOT}/{split}-{index_name}/{neighbours.LISTING}"


# ---------------------------------------------------------------- key fields (what each stage's outputs depend on)

def corpus_key(run: Run, role: str) -> dict[str, Any]:
    """A corpus as a token stream: the tokenizer and the text (path, sha256, token limit)."""
    return {"tokenizer": run.cfg.tokenizer or run.cfg.model, "corpus": run.corpora[role]}


def model_key(run: Run) -> dict[str, Any]:
    """The model by its fingerprint (config + weights), never by its path, and how it is run."""
    cfg, info = run.cfg, run.info
    return {"model_fingerprint": info["model_fingerprint"], "dtype": cfg.dtype, "max_context": info["max_context"],
            "stride": info["stride"], "batch": cfg.batch_size, "shard": cfg.shard_size}


def index_key(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    return {"factory": cfg.index_factory, "train_size": cfg.train_size, "seed": cfg.seed, "shard": cfg.shard_size}


def import_part(run: Run) -> dict[str, Any]:
    """The imported datastore's files (precompute.stages.imported), only when there is one: native keys unchanged."""
    if not run.cfg.import_datastore:
        return {}
    from precompute.stages.imported import import_key

    return {"import": import_key(run)}


def index_import_part(run: Run) -> dict[str, Any]:
    """Whether the index stage uses the imported datastore's own index (absent for native runs)."""
    return {"imported_index": bool(run.info["imported"]["index_used"])} if run.cfg.import_datastore else {}


def search_key(run: Run, up: Keys) -> dict[str, Any]:
    cfg = run.cfg
    return {"up": [up["index"], up["eval_lm"], up["valid_lm"], up["whiten"]], "k": cfg.k, "nprobe": cfg.nprobe,
            "tau": cfg.temperature, "source": cfg.distance_source, "batch": cfg.search_batch, "shard": cfg.shard_size}


def types_key(run: Run, up: Keys) -> dict[str, Any]:
    cfg = run.cfg
    return {"up": [up["datastore"], up["index"]], "mode": cfg.contamination_search, "shard": cfg.shard_size,
            "nprobe": cfg.nprobe if cfg.contamination_search == "index" else None}


def database_key(run: Run, up: Keys) -> dict[str, Any]:
    from knnlm_core import store

    ups = [up["search"], up["types"], up["exact"], up["words"], up["suffix"]]
    ups += [up["mitigate"]] if up["mitigate"] else []  # runs without mitigations keep their key
    return {"up": ups, "lambda": run.cfg.lam, "name": run.run_name, "schema": store.SCHEMA_VERSION,
            "config": run.cfg.to_dict()}


# ---------------------------------------------------------------- outputs that name other modules' files

def datastore_outputs(cfg: RunConfig) -> list[str]:
    """keys/shards.json and values.npy; an imported datastore also its check report and alignment."""
    from_import = ["import_check.json", "import_alignment.npz"] if cfg.import_datastore else []
    return ["keys/shards.json", "values.npy", *from_import]


def suffix_outputs(_cfg: RunConfig) -> list[str]:
    from precompute.stages.suffix import OUTPUTS

    return list(OUTPUTS)


def database_outputs(_cfg: RunConfig) -> list[str]:
    from knnlm_core import store

    return [store.DB_NAME]


# ---------------------------------------------------------------- run facts learnt once the token streams exist

def token_counts(run: Run) -> None:
    """n_entries, n_eval and the vocabulary size (the model's, or more if a token id exceeds it)."""
    from precompute.runner import load_npy

    ds = np.asarray(load_npy(run.path("datastore_ids.npy")))
    ev = np.asarray(load_npy(run.path("eval_ids.npy")))
    run.info["n_entries"], run.info["n_eval"] = len(ds) - 1, len(ev) - 1
    run.info["vocab_size"] = int(max(run.info["model_vocab_size"], ds.max() + 1, ev.max() + 1))


# ---------------------------------------------------------------- the planner's work per stage (plan.cost.Model)

def datastore_work(m: Model) -> list[StageWork]:
    f = m.f
    return [m.model_map("datastore", f.n, "keys", m.forward(f.tokens_ds, f.sq_ds), f.n * 4, f.n * (2 * m.d + 4),
                        head=False)]


def eval_lm_work(m: Model) -> list[StageWork]:
    f, d, v = m.f, m.d, m.f.shape.vocab
    return [m.model_map("eval_lm", f.t, "positions", m.forward(f.tokens_ev, f.sq_ev) + 2 * d * v * f.t,
                        f.t * 4, 2 * f.t * (2 * d + 8 + 80), head=True)]


def valid_lm_work(m: Model) -> list[StageWork]:
    f, d, v = m.f, m.d, m.f.shape.vocab
    if not m.cfg.valid_corpus:
        return []
    return [m.model_map("valid_lm", f.t_valid, "positions", m.forward(f.tokens_va, f.sq_va) + 2 * d * v * f.t_valid,
                        f.t_valid * 4, 2 * f.t_valid * (2 * d + 8 + 80), head=True)]


def index_work(m: Model) -> list[StageWork]:
    return [m.build("index", "", transform=False)]


def whiten_work(m: Model) -> list[StageWork]:
    """Per kind: the fit (a map of partial moments over key shards, reduced on the driver) and the index
    trained and filled on the whitened keys."""
    f, r, d = m.f, m.r, m.d
    rows = []
    for kind in m.cfg.whiten_kinds:
        if kind == "entries":  # float64 covariance: 2 d² FLOP per key at about half the fp32 GEMM rate
            flop, unit_s = 2 * f.n * d * d, 2 * d * d / (r.flat_flops / 2)
        else:  # zipfian: per-type key sums (one pass), then the covariance over types on the driver
            flop, unit_s = f.n * d + 2 * f.types * d * d, 2 * d / r.types_bytes
        reduce_s = 2 * f.types * d * d / (m.p.driver * r.flat_flops / 2) + d ** 3 / (m.p.driver * r.flat_flops)
        rows.append(StageWork("whiten", f"{kind} fit", "keys", f.n, flop, m.keys_bytes, d * d * 8,
                              m.shard * d * 12 + (f.types * d * 8 if kind == "zipfian" else d * d * 8),
                              m.cpu_map(f.n, unit_s, m.keys_bytes) + reduce_s, f"{m.cpu_where}; reduce: driver"))
        rows.append(m.build("whiten", f"{kind} index", transform=True))
    return rows


def search_work(m: Model) -> list[StageWork]:
    """Per block: the index's k neighbours of every query (quantizer, IVF scan: CPU workers, or GPU workers
    with faiss-gpu) with their exact distances recomputed on the CPU from the keys held as float32 (k rows of
    4 d bytes gathered per query; a whitened index's keys whitened once per worker, its queries per batch)."""
    cfg, f, r, d, k, p = m.cfg, m.f, m.r, m.d, m.cfg.k, m.p
    queries = {"eval": f.t, "valid": f.t_valid}
    rows = []
    for split, index_name in search_blocks(cfg):
        q = queries[split]
        whitened = index_name != "plain"
        extra = 2 * d * d if whitened else 0  # the query whitened
        dists_s = k * 4 * d / r.gather_bytes + extra / r.flat_flops  # core-seconds per query, CPU side
        resident_s = f.n * 2 * d * d / r.flat_flops / p.cores if whitened and split == "eval" else 0.0
        scan_s = r.query_s + m.visits / r.visits + 2 * d * (m.nlist + 256) / r.flat_flops
        gathered = q * k * 4 * d  # neighbour key rows read for the exact distances
        flop = q * (2 * d * (m.nlist + 256) + m.visits * m.code + 3 * k * d + extra)
        mem = f.n * (m.code + 12 + 4 * d) + cfg.search_batch * k * 24 + (d * d * 4 if whitened else 0)
        if m.faiss_gpu:
            mine = busiest(q, m.shard, p.gpus)
            gpu_s = m.visits / r.gpu_visits + 2 * d * (m.nlist + 256) / r.gpu_encode_flops
            seconds = max(mine * max(gpu_s, dists_s / p.cores), m.io(gathered, min(p.gpus, math.ceil(q / m.shard))))
            where = f"{p.gpus} GPU worker(s) (faiss-gpu; exact distances on {p.cores} cores each)"
        else:
            seconds, where = m.cpu_map(q, scan_s + dists_s, gathered), m.cpu_where
        rows.append(StageWork("search", f"{split} x {index_name}", "queries", q, flop,
                              q * m.visits * (m.code + 8) + gathered, q * k * BLOCK_BYTES_PER_NEIGHBOUR, mem,
                              seconds + resident_s, where))
    return rows


def types_work(m: Model) -> list[StageWork]:
    cfg, f, r, d, v = m.cfg, m.f, m.r, m.d, m.f.shape.vocab
    exact = cfg.contamination_search == "exact"
    key_pass = m.cpu_map(f.n, 2 * 2 * d / r.types_bytes, 2 * m.keys_bytes)  # sums, then the spread
    if exact:  # each contamination group searches every key for its types
        flop = 4 * f.n * d + 2 * f.types * f.n * d
        groups_s = f.types * f.n * 2 * d / r.flat_flops / (m.p.cpu_workers * m.p.cores)
        cont = max(groups_s, m.io(f.groups * m.keys_bytes, min(m.p.cpu_workers, f.groups)))
        read = 2 * m.keys_bytes + f.groups * m.keys_bytes
    else:
        flop = 4 * f.n * d + f.types * (2 * d * m.nlist + m.visits * m.code)
        cont = busiest(f.types, 4096, m.p.cpu_workers) * (r.query_s + m.visits / r.visits) / m.p.cores
        read = 2 * m.keys_bytes + f.types * m.visits * (m.code + 8)
    mem = v * d * 8 + 2 * m.shard * d * 4 + (0 if exact else f.n * (m.code + 12))
    return [StageWork("types", "", "types", f.types, flop, read, v * d * 8 + v * 40, mem, key_pass + cont,
                      m.cpu_where)]


def exact_work(m: Model) -> list[StageWork]:
    """Exact top-k of every evaluation query over every key (SPEC §8), mapped over query shards: GPU workers
    (matmul + top-k) when there are GPUs, else CPU workers: faiss's brute force over the keys' subspace
    bound (`precompute.exact_projection`: DIMS + 1 columns instead of d, a shortlist of SHORTLIST k keys
    reranked) when the float32 keys fit a worker's memory and d >= 2 DIMS, else over the keys themselves.
    The index's neighbours are read from the (eval, plain) block. Always costed; `runs` says whether the run
    has it."""
    from precompute.exact_projection import DIMS, SHORTLIST
    from precompute.search import RESIDENT_KEY_BYTES

    f, r, d, k = m.f, m.r, m.d, m.cfg.k
    projected = f.n * d * 4 <= RESIDENT_KEY_BYTES and d >= 2 * DIMS
    cols = DIMS + 1 if projected else d
    shortlist = SHORTLIST * k if projected else k + k // 8 + 32
    flop = 2 * f.t * f.n * cols + 3 * f.t * shortlist * d  # brute force + the rerank's exact distances
    passes = math.ceil(min(f.t, m.shard) / EXACT_QUERY_BLOCK)  # passes over every key per query shard
    rerank = shortlist * 4 * d / r.gather_bytes  # core-seconds per query: exact distances of the shortlist
    if m.p.gpus:
        workers, where = m.p.gpus, f"{m.p.gpus} GPU worker(s)"
        per_query = 2 * f.n * d / r.gpu_exact_flops + k * 4 * d / r.gather_bytes / m.p.cores
        mem = GPU_KEY_BLOCK * d * 4 + 4096 * GPU_KEY_BLOCK * 4  # GPU memory: a key block and its distances
    else:
        workers = m.p.cpu_workers
        where = m.cpu_where + (f" (subspace bound, {DIMS} of {d} dimensions)" if projected else "")
        per_query = (2 * f.n * cols / r.exact_flops + r.exact_query_s + rerank) / m.p.cores
        mem = (f.n * (4 * d + 4 * cols) if projected else min(m.keys_bytes * 2, 2 << 30)) + 4096 * shortlist * 40
    shards = math.ceil(f.t / m.shard)
    compute = busiest(f.t, m.shard, workers) * per_query
    key_reads = shards * passes * m.keys_bytes + f.t * k * 2 * d  # every key per pass, the rerank's rows
    seconds = max(compute, m.io(key_reads, min(workers, shards)))
    return [StageWork("exact", "", "queries", f.t, flop, key_reads + f.t * k * BLOCK_BYTES_PER_NEIGHBOUR,
                      f.t * k * BLOCK_BYTES_PER_NEIGHBOUR + f.t * 80, mem, seconds, where, runs=m.exact_runs)]


def suffix_work(m: Model) -> list[StageWork]:
    """SPEC §12 (on the driver): the suffix array of the datastore token stream (divsufsort over the stream's
    bytes at 2 bytes a token: int32 positions below 2^31 bytes) and its lookups (context match, ∞-gram) for
    every evaluation and validation position."""
    f, r = m.f, m.r
    positions = f.t + f.t_valid
    width = 4 if 2 * f.n < 2**31 else 8
    return [StageWork("suffix", "", "tokens", f.n, 0, f.n * 4, f.n * width + positions * 24, f.n * (2 + 2 * width),
                      f.n / r.sa_tokens + positions * r.sa_query_s, "driver (1 thread)")]


def mitigate_work(m: Model) -> list[StageWork]:
    """SPEC §9 from the blocks: validation blocks scored at every τ of the grid (the plain one also at the
    run's τ), evaluation blocks at the chosen τ (the plain one also at the run's τ, and IDF-weighted)."""
    cfg, f, r, k = m.cfg, m.f, m.r, m.cfg.k
    if not cfg.valid_corpus:
        return []
    grid = len(tau_grid(cfg.temperature))
    rows = []
    for split, q in (("valid", f.t_valid), ("eval", f.t)):
        scores = sum((grid + (i == "plain")) if split == "valid" else (3 if i == "plain" else 1)
                     for i in ("plain", *cfg.whiten_kinds))
        n_blocks = 1 + len(cfg.whiten_kinds)
        blocks = busiest(q, m.shard, m.p.cpu_workers) * n_blocks  # maps run block after block
        seconds = blocks * k * scores / n_blocks / r.score_elems
        taus = f"{grid} τ" if split == "valid" else "chosen τ"
        rows.append(StageWork("mitigate", f"{split} scores ({taus}, {n_blocks} blocks)", "queries", q * n_blocks,
                              5.0 * q * k * scores, q * n_blocks * k * 8, q * 8 * 8 * n_blocks,
                              4096 * k * (8 + 8 * (grid + 1)), seconds, f"{m.p.cpu_workers} CPU worker(s)"))
    return rows


def words_work(m: Model) -> list[StageWork]:
    f = m.f
    text = (f.n + f.t) * TEXT_BYTES_PER_TOKEN
    return [StageWork("words", "", "tokens", f.n + f.t, 0, text, f.t * 24, text * 3, text / m.r.text_bytes, "driver")]


def database_work(m: Model) -> list[StageWork]:
    cfg, f, s, exact = m.cfg, m.f, m.cfg.store_neighbors_effective, m.exact_runs
    pos_rows = f.t * (1 + s * (2 if exact else 1) + (1 if cfg.valid_corpus else 0))
    rows = pos_rows + f.shape.vocab + (0 if cfg.datastore_tokens_from else f.n + 1)
    read = f.t * s * BLOCK_BYTES_PER_NEIGHBOUR * (2 if exact else 1) + f.t * 400
    return [StageWork("database", "", "rows", rows, 0, read, f.t * s * DB_BYTES_PER_POS + rows * 4, read,
                      rows / m.r.db_rows, "driver")]


# ---------------------------------------------------------------- the list

STAGES: tuple[Stage, ...] = (
    Stage("tokenize_datastore", (), lambda run, up: corpus_key(run, "datastore"), lambda cfg: ["datastore_ids.npy"],
          "precompute.stages.tokenize:stage_tokenize_datastore", "the datastore text as a token stream"),
    Stage("tokenize_eval", (), lambda run, up: corpus_key(run, "eval"), lambda cfg: ["eval_ids.npy"],
          "precompute.stages.tokenize:stage_tokenize_eval", "the evaluation text as a token stream",
          after=token_counts),
    Stage("datastore", ("tokenize_datastore",),
          lambda run, up: {"up": up["tokenize_datastore"], **model_key(run), **import_part(run)}, datastore_outputs,
          "precompute.stages.datastore:stage_datastore",
          "keys (the last block's MLP input) and values of every datastore position (SPEC §1)",
          work=datastore_work, mapped=True),
    Stage("eval_lm", ("tokenize_eval",),
          lambda run, up: {"up": up["tokenize_eval"], "lm_top": run.cfg.lm_top, **model_key(run)},
          lambda cfg: ["queries.npy", "eval_lm.npz", "eval_entropy.npy"], "precompute.stages.eval_lm:stage_eval_lm",
          "queries and the LM's distribution at every evaluation position (SPEC §1)", work=eval_lm_work, mapped=True),
    Stage("valid_lm", (), lambda run, up: {**corpus_key(run, "valid"), "lm_top": run.cfg.lm_top, **model_key(run)},
          lambda cfg: ["valid_ids.npy", "valid_queries.npy", "valid_lm.npz", "valid_entropy.npy"],
          "precompute.stages.eval_lm:stage_valid_text", "the validation text tokenized and run through the model "
          "(SPEC §9)", enabled=lambda run: bool(run.cfg.valid_corpus), work=valid_lm_work, mapped=True),
    Stage("index", ("datastore",), lambda run, up: {"up": up["datastore"], **index_key(run), **index_import_part(run)},
          lambda cfg: ["index.faiss", "pq.npz"], "precompute.stages.index:stage_index",
          "the faiss index trained and filled, and every entry's PQ error (SPEC §2, §4)", work=index_work, mapped=True),
    Stage("whiten", ("datastore",),
          lambda run, up: {"up": up["datastore"], "kinds": list(run.cfg.whiten_kinds), "eps": run.cfg.whiten_eps,
                           **index_key(run)},
          lambda cfg: whiten_outputs(cfg.whiten_kinds), "precompute.stages.whiten:stage_whiten",
          "a whitening per kind and an index on the whitened keys (SPEC §9)",
          enabled=lambda run: bool(run.cfg.whiten_kinds), work=whiten_work, mapped=True),
    Stage("search", ("index", "eval_lm", "valid_lm", "whiten"), search_key,
          lambda cfg: ["search.npz"] + [block_listing(s, i) for s, i in search_blocks(cfg)],
          "precompute.stages.search:stage_search",
          "every query split searched on every index once, into neighbour blocks (SPEC §2, §4, §7)",
          work=search_work, mapped=True),
    Stage("types", ("datastore", "index"), types_key, lambda cfg: ["types.npz"], "precompute.stages.types:stage_types",
          "per-type centroid spread and contamination (SPEC §5)", work=types_work, mapped=True),
    Stage("exact", ("search",), lambda run, up: {"up": up["search"], "shard": run.cfg.shard_size},
          lambda cfg: ["exact.npz", block_listing("eval", "exact")], "precompute.stages.exact:stage_exact",
          "exact top-k of every evaluation query beside the index's (SPEC §8)",
          enabled=lambda run: bool(run.info["exact_search"]), work=exact_work, mapped=True),
    Stage("suffix", ("tokenize_datastore", "tokenize_eval", "valid_lm"),
          lambda run, up: {"up": [up["tokenize_datastore"], up["tokenize_eval"], up["valid_lm"]],
                           "max_len": run.cfg.ctx_max_len, "shard": run.cfg.shard_size},
          suffix_outputs, "precompute.stages.suffix:stage_suffix",
          "the datastore's suffix array, context match and ∞-gram per position (SPEC §12)", work=suffix_work),
    Stage("mitigate", ("search", "suffix"),
          lambda run, up: {"up": [up["search"], up["suffix"]], "lambda": run.cfg.lam, "bins": run.cfg.adaptive_bins,
                           "tau_grid": TAU_GRID.tolist()},
          lambda cfg: ["mitigations.npz", "mitigations.json"], "precompute.stages.mitigate:stage_mitigate",
          "the SPEC §9 mitigations scored from the blocks, fitted on validation",
          enabled=lambda run: bool(run.cfg.valid_corpus), work=mitigate_work, mapped=True),
    Stage("words", ("tokenize_datastore", "tokenize_eval"),
          lambda run, up: {"up": [up["tokenize_datastore"], up["tokenize_eval"]]}, lambda cfg: ["words.npz"],
          "precompute.stages.words:stage_words", "whole words of both texts and their counts (SPEC §10)",
          work=words_work),
    Stage("database", ("search", "types", "exact", "words", "suffix", "mitigate"), database_key, database_outputs,
          "precompute.stages.database:stage_database", "every table of metrics.duckdb (SPEC §7)",
          work=database_work),
)


def stage_names() -> list[str]:
    """Every stage's name, in run order (stages.json's names)."""
    return [s.name for s in STAGES]


def stage(name: str) -> Stage:
    """The stage called `name` (KeyError if there is none)."""
    return {s.name: s for s in STAGES}[name]
