"""Plan before you spend: per-stage work, disk, memory and wall time of a run on G GPUs and C CPU cores.

    python -m precompute.plan --config configs/gpt2-xl-wikitext103.toml --gpus 8 --cpus 128 [--rates R.json]
    python -m precompute.plan --calibrate [--out R.json]        # measure rates here with a short real run

Work is counted from the config, the model's shape and the corpus sizes: entries, FLOP
(forward passes over overlapping windows, k-means, PQ encoding, IVF scans), bytes read and
written. Wall time = work / rate, with rates per GPU or per CPU core (defaults derived from
the H100 measurements in the README and NOTES; `--calibrate` measures this machine's).
Maps divide over workers (the Ray executor's pools); trains and reduces run on the driver.
`--measured RUN_DIR` prints the plan beside a built run's stage seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from knnlm_core.config import ConfigError, RunConfig, load_config, resolve_path
from precompute.cli import Parser, UsageError, int_in, path_arg, run_cli

GB = 1e9
KMEANS_ITERS = 25  # faiss ClusteringParameters.niter (IVF and PQ training)
MAX_PER_CENTROID = 256  # faiss subsamples k-means training to 256 points per centroid
DB_BYTES_PER_POS = 14  # DuckDB bytes per stored neighbour per evaluation position (shipped demo: ~880 B / pos)
# Corpus sizes in GPT-2 tokens for files that may not be on this machine (the paper's datastore).
KNOWN_TOKENS = {"wiki.train.tokens": 117_000_000, "wikitext2-train.tokens.gz": 2_448_382,
                "wikitext2-test.raw.gz": 286_221, "wikitext2-valid.raw.gz": 249_887}
TAU_GRID_SIZE = 66  # τ values scored per validation query (precompute.stages.mitigate.tau_grid)
GATED = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo", "olmo2")


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: sizes only (no weights)."""

    d: int  # hidden size = key dimension
    layers: int
    vocab: int
    ffn: int  # feed-forward inner size
    gated: bool  # SwiGLU-style FFN (3 matrices) instead of 2
    positions: int = 1024  # context length of the model (windows are capped at 1024, SPEC §1)

    @property
    def body_params(self) -> int:
        return self.layers * (4 * self.d * self.d + (3 if self.gated else 2) * self.d * self.ffn)

    @property
    def params(self) -> int:
        return self.body_params + 2 * self.vocab * self.d  # embedding + head (counted untied: an upper bound)


KNOWN_MODELS = {
    "gpt2-xl": ModelShape(1600, 48, 50257, 6400, False, 1024),
    "gpt2": ModelShape(768, 12, 50257, 3072, False, 1024),
    "meta-llama/Llama-3.1-8B": ModelShape(4096, 32, 128256, 14336, True, 131072),
}


@dataclass(frozen=True)
class Rates:
    """Throughputs per worker unit. GPU: per GPU. CPU: per core (a worker runs `threads` cores)."""

    gpu_flops: float = 3.1e14  # model forward FLOP/s per H100, bf16 (50.4k GPT2-XL keys/s, README)
    cpu_flops: float = 2.0e10  # model forward FLOP/s per CPU core (fp32)
    cpu_head_flops: float = 2.0e10  # eval (body + LM head) FLOP/s per core
    # sa_encode's PQ part (assign + decode + error) FLOP/s per core; its coarse assignment is a flat search
    # (flat_flops). From 18.7k keys/s at d 1600, IVF1024,PQ64 on 16 cores, less the coarse part.
    encode_flops: float = 1.2e9
    train_flops: float = 2.0e10  # k-means FLOP/s per driver core (BLAS; 2-core machine here: ~7e10)
    visits: float = 1.8e6  # IVF code visits/s per core (775 q/s, 31k visits/q, 16 cores, minus the fixed part)
    query_s: float = 2.5e-3  # fixed seconds per query per core (quantizer, heap of k, p_kNN, exact dists)
    flat_flops: float = 2.0e10  # flat search (a GEMM) FLOP/s per core: coarse assignment, exact contamination
    types_bytes: float = 2.0e8  # key bytes/s per core for the per-type sums and spread
    db_rows: float = 2.0e6  # DuckDB rows/s on the driver
    load_bytes: float = 1.0e9  # model weight bytes/s loaded per model worker (shared filesystem)
    start_s: float = 5.0  # seconds to start a pool of Ray actors (imports) per map stage


@dataclass(frozen=True)
class Facts:
    """Sizes of one run: entries, evaluation positions, types seen, model shape, windows."""

    n: int  # datastore entries
    t: int  # evaluation positions
    types: int  # distinct datastore values (types with freq >= 1)
    groups: int  # contamination groups (types bucketed by m_v, TYPES_PER_SHARD per group)
    tokens_ds: int  # tokens run through the model for the datastore (windows overlap)
    tokens_ev: int
    sq_ds: int  # sum of window length² (attention cost)
    sq_ev: int
    shape: ModelShape
    source: str  # where the counts come from: "tokenized" or "known sizes"
    t_valid: int = 0  # validation positions (SPEC §9 mitigations; 0 = none)
    tokens_va: int = 0
    sq_va: int = 0


# ---------------------------------------------------------------- facts

def model_shape(cfg: RunConfig) -> ModelShape:
    """The model's sizes from its local config, else from KNOWN_MODELS (hub models need no download)."""
    if cfg.model in KNOWN_MODELS:
        return KNOWN_MODELS[cfg.model]
    from knnlm_core.model import load_model_config
    from precompute.runner import model_source

    try:
        mc = load_model_config(str(model_source(cfg.model)))
    except Exception as err:  # noqa: BLE001 - any failure: offline hub name, missing directory
        raise ConfigError(f"cannot read the shape of model {cfg.model!r} ({err}); use a local directory or one of "
                          f"{sorted(KNOWN_MODELS)}") from err
    d = int(mc.hidden_size)
    ffn = getattr(mc, "intermediate_size", None) or getattr(mc, "n_inner", None) or 4 * d
    positions = getattr(mc, "n_positions", None) or getattr(mc, "max_position_embeddings", 1024)
    return ModelShape(d, int(mc.num_hidden_layers), int(mc.vocab_size), int(ffn), mc.model_type in GATED,
                      int(positions))


def window_work(n_tokens: int, ctx: int, stride: int) -> tuple[int, int]:
    """(tokens run through the model, sum of squared window lengths) of the sliding windows over n_tokens."""
    from knnlm_core.windows import plan_windows

    if n_tokens <= 2_000_000:
        lengths = [w.end - w.begin for w in plan_windows(n_tokens, ctx, stride)]
        return sum(lengths), sum(x * x for x in lengths)
    windows = 1 + max(0, math.ceil((n_tokens - ctx) / stride))  # closed form for large corpora
    return windows * ctx, windows * ctx * ctx


def corpus_ids(cfg: RunConfig, rel: str, limit: int):
    """Token ids of a corpus (tokenized here) or None when the file or tokenizer is not available."""
    from precompute.runner import model_source

    path, source = resolve_path(rel), model_source(cfg.tokenizer or cfg.model)
    if not path.exists() or not Path(source).is_dir():  # a hub tokenizer would need the network
        return None
    try:
        from knnlm_core.corpus import load_tokenizer, tokenize_file

        return tokenize_file(path, load_tokenizer(str(source)), limit or None)
    except Exception:  # noqa: BLE001 - offline hub tokenizer: fall back to known sizes
        return None


def run_facts(cfg: RunConfig, entries: int = 0, eval_positions: int = 0) -> Facts:
    """Sizes of the run `cfg` describes: tokenized here when the corpora are, else KNOWN_TOKENS."""
    import numpy as np

    from precompute.stages.types import contamination_groups

    shape = model_shape(cfg)
    ctx = cfg.max_context or min(shape.positions, 1024)  # as precompute.pipeline.resolve_windows
    stride = cfg.stride or max(1, ctx // 2)
    ds = None if entries else corpus_ids(cfg, cfg.datastore_corpus, cfg.datastore_limit_tokens)
    ev = None if eval_positions else corpus_ids(cfg, cfg.eval_corpus, cfg.eval_limit_tokens)
    if ds is not None:
        n = len(ds) - 1
        freq = np.bincount(ds[1:], minlength=shape.vocab)
        types, groups = int((freq > 0).sum()), len(contamination_groups(freq))
    else:
        n = entries or known_size(cfg.datastore_corpus, cfg.datastore_limit_tokens) - 1
        # Heaps' law through WikiText-2's 27,102 types in 2.45M tokens, capped by the vocabulary
        types = min(shape.vocab, int(27_102 * (n / 2.45e6) ** 0.45))
        groups = 11 + math.ceil(types / 4096)  # m_v buckets 1, 2, ..., 1024 + full groups of 4096
    t = len(ev) - 1 if ev is not None else eval_positions or known_size(cfg.eval_corpus, cfg.eval_limit_tokens) - 1
    tok_ds, sq_ds = window_work(n + 1, ctx, stride)
    tok_ev, sq_ev = window_work(t + 1, ctx, stride)
    t_v = 0
    if cfg.valid_corpus:
        va = corpus_ids(cfg, cfg.valid_corpus, cfg.valid_limit_tokens)
        if va is not None:
            t_v = len(va) - 1
        elif Path(cfg.valid_corpus).name in KNOWN_TOKENS:
            t_v = known_size(cfg.valid_corpus, cfg.valid_limit_tokens) - 1
        else:  # an unknown validation text: plan it at the evaluation text's size
            t_v = t
    tok_va, sq_va = window_work(t_v + 1, ctx, stride) if t_v else (0, 0)
    return Facts(n, t, types, groups, tok_ds, tok_ev, sq_ds, sq_ev, shape,
                 "tokenized" if ds is not None else "known sizes", t_v, tok_va, sq_va)


def known_size(rel: str, limit: int) -> int:
    name = Path(rel).name
    if name not in KNOWN_TOKENS:
        raise ConfigError(f"corpus {rel} is not on this machine and its size is unknown: pass --entries / "
                          "--eval-positions")
    return min(KNOWN_TOKENS[name], limit) if limit else KNOWN_TOKENS[name]


# ---------------------------------------------------------------- work and time

@dataclass
class StageWork:
    name: str
    units: str  # what the count counts
    count: int
    flop: float
    read: float  # bytes
    written: float  # bytes
    worker_mem: float  # bytes per worker
    seconds: float = 0.0
    where: str = ""  # which workers run it


def ivf(cfg: RunConfig) -> tuple[int, int]:
    """(nlist, PQ code bytes) of the index factory (nlist 1 without IVF; code = m bytes for PQm, d for Flat)."""
    import re

    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", cfg.index_factory)) else 1
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", cfg.index_factory)
    code = int(pq.group(1)) * int(pq.group(2) or 8) // 8 if pq else 0
    return nlist, code


def train_flop(cfg: RunConfig, f: Facts) -> float:
    """k-means FLOP of training the index once (coarse centroids + 256 PQ centroids per sub-space)."""
    nlist, _ = ivf(cfg)
    n_train = min(cfg.train_size or f.n, f.n)
    return 2 * KMEANS_ITERS * f.shape.d * (min(n_train, MAX_PER_CENTROID * nlist) * nlist + min(n_train, 65536) * 256)


def stage_work(cfg: RunConfig, f: Facts) -> list[StageWork]:
    """Per-stage work of one run (no rates: counts, FLOP, bytes, memory per worker)."""
    s, d, v = cfg.store_neighbors_effective, f.shape.d, f.shape.vocab
    nlist, code = ivf(cfg)
    code = code or d * 4
    wbytes = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    fwd = lambda tok, sq: 2 * f.shape.body_params * tok + 2 * f.shape.layers * d * sq  # noqa: E731
    act = cfg.batch_size * (cfg.max_context or min(f.shape.positions, 1024)) * (4 * d + f.shape.ffn) * wbytes * 2
    model_mem = f.shape.params * wbytes + act
    n_train = min(cfg.train_size or f.n, f.n)
    train = train_flop(cfg, f)
    visits = cfg.nprobe * f.n / nlist  # codes scanned per query
    search_pos = 8 * 5 + 8 * 10 * 2 + s * (8 + 4 + 4)  # search.npz bytes per position
    block = cfg.shard_size * d * 4
    exact = cfg.contamination_search == "exact"
    return [
        StageWork("datastore", "keys", f.n, fwd(f.tokens_ds, f.sq_ds), f.n * 4, f.n * (2 * d + 4), model_mem),
        StageWork("eval_lm", "positions", f.t, fwd(f.tokens_ev, f.sq_ev) + 2 * d * v * f.t, f.t * 4,
                  2 * f.t * (2 * d + 8 + 80), model_mem + 1024 * v * 4 * 2),
        StageWork("index", "keys", f.n, train + 2 * d * (nlist + 256) * f.n, f.n * 2 * d + n_train * 2 * d,
                  2 * f.n * (code + 8) + 16 * f.n, 2 * block + (nlist + 256) * d * 4 + cfg.shard_size * (code + 8)),
        StageWork("search", "queries", f.t, f.t * (2 * d * (nlist + 256) + visits * code + 3 * s * d),
                  f.t * (2 * d + 2 * s * d + visits * (code + 8)), 2 * f.t * search_pos,
                  f.n * (code + 12) + cfg.search_batch * cfg.k * 40 + 256 * max(s, cfg.k if cfg.distance_source
                                                                                 == "exact" else s) * d * 4),
        StageWork("types", "types", f.types, 4 * f.n * d + (2 * f.types * f.n * d if exact else
                                                            f.types * (2 * d * nlist + visits * code)),
                  2 * f.n * 2 * d + (f.groups * f.n * 2 * d if exact else f.types * visits * (code + 8)),
                  v * d * 8 + v * 40, v * d * 8 + 2 * block + (0 if exact else f.n * (code + 12))),
        *mitigation_work(cfg, f, fwd, model_mem, train, visits, code),
        StageWork("database", "rows", f.t * (1 + s) + v, 0, 2 * f.t * search_pos, f.t * s * DB_BYTES_PER_POS,
                  2 * f.t * search_pos),
    ]


def mitigation_work(cfg: RunConfig, f: Facts, fwd, model_mem: float, train: float, visits: float,
                    code: int) -> list[StageWork]:
    """SPEC §9 stages when the config has a validation corpus: the validation forward pass, and the
    mitigate stage (per whitening kind a streamed fit, an index build over the whitened keys; the
    validation and evaluation queries searched over the plain and every whitened index)."""
    if not cfg.valid_corpus:
        return []
    d, v, kinds = f.shape.d, f.shape.vocab, len(cfg.whiten_kinds)
    nlist, _ = ivf(cfg)
    queries = (1 + kinds) * (f.t + f.t_valid)
    fit = kinds * 2 * f.n * d * d  # covariance / type sums: one float64 pass over the keys per kind
    build = kinds * (train + 2 * d * (nlist + 256) * f.n)
    search = queries * (2 * d * (nlist + 256) + visits * code + 2 * d * TAU_GRID_SIZE)
    return [
        StageWork("valid_lm", "positions", f.t_valid, fwd(f.tokens_va, f.sq_va) + 2 * d * v * f.t_valid,
                  f.t_valid * 4, 2 * f.t_valid * (2 * d + 8 + 80), model_mem + 1024 * v * 4 * 2),
        StageWork("mitigate", "queries", queries, fit + build + search,
                  kinds * 2 * f.n * 2 * d + queries * (2 * d + visits * (code + 8)),
                  kinds * (f.n * (code + 8) + d * d * 8) + f.t * 8 * 8,
                  f.n * (code + 12) + cfg.search_batch * cfg.k * 40 + cfg.shard_size * d * 4 * 2),
    ]


def estimate(cfg: RunConfig, f: Facts, rates: Rates, gpus: int, cpus: int, nodes: int,
             executor: str = "ray") -> list[StageWork]:
    """stage_work with seconds: model maps over GPUs (or CPU cores), CPU maps over the CPU workers' cores.

    Each map stage also pays its fixed costs: the model load per model worker, and with Ray
    the start of its actor pool.
    """
    from precompute.executor import pool_shape

    work = stage_work(cfg, f)
    workers, each = pool_shape([cpus / nodes] * nodes, cfg.threads)
    if executor == "local":
        workers, gpus = 1, min(gpus, 1)
    cores = max(1, min(cpus, workers * cfg.threads))  # a worker runs `threads` threads
    start = rates.start_s if executor == "ray" else 0.0
    load = f.shape.params * (2 if cfg.dtype != "float32" else 4) / rates.load_bytes
    nlist, code = ivf(cfg)
    visits = cfg.nprobe * f.n / nlist
    query_s = lambda q: q * (rates.query_s + visits / rates.visits) / cores  # noqa: E731
    driver = max(1, min(cfg.threads, cpus // nodes))
    for w in work:
        if w.name in ("datastore", "eval_lm", "valid_lm"):
            rate = gpus * rates.gpu_flops if gpus else cores * (rates.cpu_flops if w.name == "datastore"
                                                                 else rates.cpu_head_flops)
            w.seconds = w.flop / rate + load + start
            w.where = f"{gpus} GPU worker(s)" if gpus else f"CPU, {cores} cores"
        elif w.name == "index":
            train = train_flop(cfg, f)
            coarse = 2 * f.shape.d * nlist * f.n
            w.seconds = (train / (driver * rates.train_flops) + coarse / (cores * rates.flat_flops)
                         + (w.flop - train - coarse) / (cores * rates.encode_flops) + start)
            w.where = f"train: driver ({driver} cores); encode: {workers} CPU worker(s), {cores} cores"
        elif w.name == "search":
            w.seconds, w.where = query_s(f.t) + start, f"{workers} CPU worker(s), {cores} cores"
        elif w.name == "mitigate":  # runs on the driver (its searches are not mapped onto workers)
            kinds, d = len(cfg.whiten_kinds), f.shape.d
            build = kinds * (train_flop(cfg, f) / (driver * rates.train_flops) + 2 * d * nlist * f.n / (driver * rates.flat_flops)
                             + 2 * d * 256 * f.n / (driver * rates.encode_flops))
            fit = kinds * 2 * f.n * d * d / (driver * rates.flat_flops)
            queries = (1 + kinds) * (f.t + f.t_valid)
            w.seconds = build + fit + queries * (rates.query_s + visits / rates.visits) / driver
            w.where = f"driver ({driver} cores)"
        elif w.name == "types":
            key_pass = 2 * f.n * 2 * f.shape.d / (cores * rates.types_bytes)
            if cfg.contamination_search == "exact":
                cont = 2 * f.types * f.n * f.shape.d / (cores * rates.flat_flops)
            else:
                cont = query_s(f.types)
            w.seconds, w.where = key_pass + cont + start, f"{workers} CPU worker(s), {cores} cores"
        else:
            w.seconds, w.where = w.count / rates.db_rows, "driver"
    return work


# ---------------------------------------------------------------- calibration

def calibrate(work_dir: Path, config: str = "configs/ci-tiny.toml") -> Rates:
    """Rates of this machine from a short real run (local executor) of `config`, plus two timed searches."""
    from tqdm import tqdm

    from precompute.pipeline import build_run

    # 10k evaluation tokens: enough that the LM head's rate, not start-up, is what eval_lm measures
    cfg = load_config(resolve_path(config), {"eval_limit_tokens": 10_000})
    run_dir = work_dir / "calibration"
    build_run(cfg, run_dir)
    stages = json.loads((run_dir / "stages.json").read_text())
    sec = {k: max(v["seconds"], 1e-3) for k, v in stages.items()}
    f = run_facts(cfg)
    work = {w.name: w for w in stage_work(cfg, f)}
    cores = cfg.threads
    nlist, code = ivf(cfg)
    train = train_flop(cfg, f)
    train_s = max(stages["index"]["info"].get("index_train_seconds", 0.0), 1e-3)
    query_s, visit_rate = time_search(run_dir, cfg, f)
    flat = time_flat(run_dir, min(f.types, 2048))
    coarse = 2 * f.shape.d * nlist * f.n  # the encode's coarse assignment: a flat search against nlist centroids
    tqdm.write(f"throughput of one worker ({cores} threads) in this run: extraction {f.n / sec['datastore']:,.0f} "
               f"keys/s, eval {f.t / sec['eval_lm']:,.0f} positions/s, encoding {f.n / max(sec['index'] - train_s, 1e-3):,.0f}"
               f" keys/s (+ {train_s:.0f} s training), search {f.t / sec['search']:,.0f} queries/s")
    return Rates(
        gpu_flops=Rates.gpu_flops,
        cpu_flops=work["datastore"].flop / sec["datastore"] / cores,
        cpu_head_flops=work["eval_lm"].flop / sec["eval_lm"] / cores,
        encode_flops=(work["index"].flop - train - coarse) / max(sec["index"] - train_s - coarse / (cores * flat),
                                                                  1e-3) / cores,
        train_flops=train / train_s / cores,
        visits=visit_rate / cores, query_s=query_s * cores, flat_flops=flat,
        types_bytes=time_key_pass(run_dir, cfg.shard_size) / cores,
        db_rows=work["database"].count / sec["database"],
    )


def time_search(run_dir: Path, cfg: RunConfig, f: Facts) -> tuple[float, float]:
    """(fixed seconds per query, IVF code visits per second) on all cores, from the search stage's own
    per-shard function timed at two nprobe values over the same queries."""
    import numpy as np

    from knnlm_core.index import set_nprobe
    from knnlm_core.keystore import open_keys
    from precompute.runner import read_index
    from precompute.stages.search import search_range

    index = read_index(run_dir / "index.faiss")
    keys, values = open_keys(run_dir), np.load(run_dir / "values.npy")
    queries = np.load(run_dir / "queries.npy")[:2048]
    targets = np.load(run_dir / "eval_ids.npy")[1 : len(queries) + 1].astype(np.int64)
    nlist, _ = ivf(cfg)
    points = []
    for nprobe in (1, max(2, nlist // 2)):
        set_nprobe(index, nprobe)
        t0 = time.time()
        search_range(index, keys, values, queries, targets, cfg, 0, len(queries))
        points.append((nprobe * f.n / nlist, (time.time() - t0) / len(queries)))
    (v1, t1), (v2, t2) = points
    per_visit = max((t2 - t1) / (v2 - v1), 1e-12)
    return max(t1 - v1 * per_visit, 1e-6), 1 / per_visit


def time_flat(run_dir: Path, n_queries: int) -> float:
    """Exact (flat) search FLOP/s per core: as many queries as a contamination group has, against every key."""
    import faiss
    import numpy as np

    from knnlm_core.keystore import open_keys
    from knnlm_core.metrics import exact_knn

    keys = open_keys(run_dir)
    q = np.asarray(keys[:n_queries], dtype=np.float32)
    t0 = time.time()
    exact_knn(q, keys, 16)
    return 2 * len(q) * len(keys) * keys.shape[1] / (time.time() - t0) / faiss.omp_get_max_threads()


def time_key_pass(run_dir: Path, shard_size: int) -> float:
    """Key bytes/s on all cores of one per-type pass (the centroid sums of the types stage) over the run's keys."""
    import numpy as np

    from knnlm_core.keystore import open_keys
    from precompute.stages.types import centroid_sums

    keys, values = open_keys(run_dir), np.load(run_dir / "values.npy")
    t0 = time.time()
    for lo in range(0, len(keys), shard_size):
        centroid_sums(np.asarray(keys[lo : lo + shard_size], dtype=np.float32), values[lo : lo + shard_size])
    return keys.shape[0] * keys.shape[1] * 2 / (time.time() - t0)


# ---------------------------------------------------------------- report

def disk(cfg: RunConfig, f: Facts) -> tuple[float, float]:
    """(shared storage at peak, local disk per node) in bytes."""
    _, code = ivf(cfg)
    code = code or f.shape.d * 4
    keys = f.n * (2 * f.shape.d + 4)
    index = f.n * (code + 8)
    shared = keys + 2 * index + 8 * f.n + f.t * (2 * f.shape.d + 400 + cfg.store_neighbors_effective * 30)
    local = f.shape.params * (2 if cfg.dtype != "float32" else 4) + 2 * GB  # model cache + Ray session dir
    return shared, local


def fmt(x: float, unit: str = "") -> str:
    for cut, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= cut:
            return f"{x / cut:.1f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def hms(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else \
        f"{seconds:.0f} s"


def report(cfg: RunConfig, f: Facts, work: list[StageWork], gpus: int, cpus: int, nodes: int,
           measured: dict[str, float] | None = None) -> str:
    shared, local = disk(cfg, f)
    lines = [f"plan: {cfg.model} ({f.shape.d}-d keys), {f.n:,} entries, {f.t:,} eval positions, {f.types:,} types "
             f"({f.source}); {cfg.index_factory}, nprobe {cfg.nprobe}, k {cfg.k}; {gpus} GPU(s), {cpus} CPU cores, "
             f"{nodes} node(s)",
             f"{'stage':10s} {'work':>18s} {'FLOP':>10s} {'read':>10s} {'written':>10s} {'mem/worker':>11s} "
             f"{'est. wall':>10s}" + ("  measured   error" if measured else "") + "  where"]
    for w in work:
        row = (f"{w.name:10s} {f'{w.count:,} {w.units}':>18s} {fmt(w.flop):>10s} {fmt(w.read, 'B'):>10s} "
               f"{fmt(w.written, 'B'):>10s} {fmt(w.worker_mem, 'B'):>11s} {hms(w.seconds):>10s}")
        if measured:
            m = measured.get(w.name)
            row += f"  {hms(m):>8s} {100 * (w.seconds - m) / m:+6.0f}%" if m else f"  {'-':>8s} {'':>7s}"
        lines.append(row + f"  {w.where}")
    total = sum(w.seconds for w in work)
    lines.append(f"total estimated wall: {hms(total)}" + (f"; measured {hms(sum(measured.get(w.name, 0) for w in work))}"
                                                          f" ({100 * (total / sum(measured.get(w.name, 0) for w in work) - 1):+.0f}%)"
                                                          if measured else ""))
    _, code = ivf(cfg)
    driver = f.n * ((code or 4 * f.shape.d) + 8 + 16) + 2 * f.t * (200 + 16 * cfg.store_neighbors_effective)
    lines.append(f"driver memory: {fmt(driver, 'B')} (the filled index, per-entry PQ error, search results)")
    lines.append(f"disk: shared storage {fmt(shared, 'B')} at peak (keys {fmt(f.n * 2 * f.shape.d, 'B')} fp16); "
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
    """Rates from a --calibrate JSON file (UsageError naming the fix if unreadable), else the built-in ones."""
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
        if args.out is not None and not Path(args.out).parent.is_dir():
            raise UsageError(f"--out {args.out}: its folder does not exist")
        with tempfile.TemporaryDirectory() as tmp:
            rates = calibrate(Path(tmp), args.calibration_config)
        text = json.dumps(asdict(rates), indent=2)
        if args.out:
            args.out.write_text(text + "\n")
        print(f"rates measured with {args.calibration_config} on this machine (per core; per GPU for gpu_flops, "
              f"not measured here):\n{text}")
        return 0
    if args.config is None:
        raise UsageError("--config is required (or --calibrate)")
    cfg = load_config(args.config, {"model": args.model}, {"model": "--model"})
    rates = read_rates(args.rates)
    measured = read_measured(args.measured)
    nodes = args.nodes or max(1, math.ceil(args.gpus / 8))
    facts = run_facts(cfg, args.entries, args.eval_positions)
    work = estimate(cfg, facts, rates, args.gpus, args.cpus, nodes, args.executor)
    print(report(cfg, facts, work, args.gpus, args.cpus, nodes, measured))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: plan(argv), "plan")


if __name__ == "__main__":
    sys.exit(main())

