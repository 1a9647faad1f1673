"""The cost model: each stage's work (counts, FLOP, bytes, memory per worker) and wall time on a machine.

Work is counted from the config and the run's sizes (`precompute.plan.facts`); wall time =
work / rate, with rates per GPU, per CPU core or per worker (`Rates`: defaults from the H100
host measurements of the README, `--calibrate` measures this machine's). Each stage of
`precompute.stages.STAGES` gives its rows from this model (`Stage.work`; `precompute.plan.rows`
asks them in run order). A map runs its shards on the executor's workers and never splits a shard,
so it takes at least its largest shard's time (`busiest`); reading keys from storage bounds a
map from below (`read_bytes` per node). Trains and reduces run on the driver.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from knnlm_core.config import RunConfig
from precompute.plan.facts import Facts

GB = 1e9
KMEANS_ITERS = 25  # faiss ClusteringParameters.niter (IVF and PQ training)
MAX_PER_CENTROID = 256  # faiss subsamples k-means training to 256 points per centroid
DB_BYTES_PER_POS = 14  # DuckDB bytes per stored neighbour per evaluation position (shipped demo: ~880 B / pos)
BLOCK_BYTES_PER_NEIGHBOUR = 8 + 4 + 4 + 4  # neighbour block (SPEC §7): id int64, value int32, two float32 distances
EXACT_QUERY_BLOCK = 16384  # precompute.search.exact_rows: queries per pass over every key
GPU_KEY_BLOCK = 1 << 18  # precompute.exact.GPU_KEY_BLOCK: keys per block on the GPU
TEXT_BYTES_PER_TOKEN = 4.5  # UTF-8 bytes of English text per GPT-2 token (WikiText)


@dataclass(frozen=True)
class Rates:
    """Throughputs per unit: per GPU, per CPU core (a worker runs `threads` cores), per worker or per node."""

    gpu_flops: float = 3.1e14  # model forward FLOP/s per H100, bf16 (50.4k GPT2-XL keys/s, README)
    # exact top-k FLOP/s per GPU (2 d per query and key): issue 15's goal for the low-precision shortlist + fp32
    # rerank, 20k queries/s over 1M x 1600 keys on one H100/H200 (not measured yet; the fp32 path measured 1.5e13)
    gpu_exact_flops: float = 6.4e13
    # IVFPQ encoding in torch on a GPU, FLOP/s per GPU (2 d (nlist + 256) per key): issue 15's goal, 10x faiss on
    # the H100 host's 16 cores (18.7k keys/s at d 1600, IVF4096); not measured yet
    gpu_encode_flops: float = 2.6e12
    # faiss-gpu (where installed): IVFPQ code visits/s per GPU (k <= 2048; assumed: ~1/5 of an H100's bandwidth
    # for 64-byte codes, not measured); its k-means runs at gpu_encode_flops
    gpu_visits: float = 1.0e10
    cpu_flops: float = 2.0e10  # model forward FLOP/s per CPU core (fp32)
    cpu_head_flops: float = 2.0e10  # eval (body + LM head) FLOP/s per core
    # sa_encode's PQ part (assign + decode + error) FLOP/s per core; its coarse assignment is a flat search
    # (flat_flops). From 18.7k keys/s at d 1600, IVF1024,PQ64 on 16 cores, less the coarse part.
    encode_flops: float = 1.2e9
    train_flops: float = 2.0e10  # coarse (IVF) k-means FLOP/s per driver core (BLAS; 2-core machine here: ~7e10)
    # PQ codebook k-means FLOP/s per driver core: m k-means over d / m-dim sub-vectors (3-d for PQ64 at d 192),
    # small GEMMs far below the coarse rate on such shapes (assumed equal to it by default)
    pq_train_flops: float = 2.0e10
    visits: float = 1.8e6  # IVF code visits/s per core (775 q/s, 31k visits/q, 16 cores, minus the fixed part)
    query_s: float = 2.5e-3  # fixed seconds per query per core (quantizer heap, heap of k, p_kNN of the block)
    flat_flops: float = 2.0e10  # flat search (a GEMM) FLOP/s per core: coarse assignment, contamination, whitening
    exact_flops: float = 2.0e10  # the exact stage's CPU brute force (faiss flat shortlist) FLOP/s per core
    exact_query_s: float = 5.0e-3  # its fixed seconds per query per core (shortlist heap, rerank, certificate)
    types_bytes: float = 2.0e8  # key bytes/s per core of a pass over keys (per-type sums, whitening fits)
    gather_bytes: float = 4.0e8  # neighbour key bytes/s per core gathered for exact distances (random float32 rows)
    score_elems: float = 4.0e7  # mitigate: neighbour scores (an exp and a sum) per second per worker (numpy)
    read_bytes: float = 2.0e9  # key bytes/s a node reads from storage (a big run's keys exceed the page cache)
    sa_tokens: float = 2.0e6  # suffix-array build: datastore tokens/s (divsufsort, one thread; 2.5e6 at 2.45M here)
    # suffix-array lookups (context match + ∞-gram) per position, seconds: 3.4e-5 over 2.45M tokens here; random
    # reads of a 117M-token array cost more
    sa_query_s: float = 1.0e-4
    text_bytes: float = 5.0e7  # words stage: datastore text bytes split and counted per second (driver)
    db_rows: float = 2.0e6  # DuckDB rows/s on the driver
    load_bytes: float = 1.0e9  # model weight bytes/s loaded per model worker (shared filesystem)
    start_s: float = 5.0  # seconds to start a pool of Ray actors (imports) per map stage


@dataclass(frozen=True)
class Machine:
    """Where a run goes: GPUs and CPU cores (all nodes together), nodes, and the executor."""

    gpus: int = 0
    cpus: int = 16
    nodes: int = 1
    executor: str = "ray"  # "ray": pools of actors; "local": one process (one GPU at most, `threads` cores)
    faiss_gpu: bool = False  # faiss has GPU support there: index training and IVFPQ searches on the GPUs

    def describe(self) -> str:
        out = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}, {self.cpus} CPU core{'s' if self.cpus != 1 else ''}"
        out += f", {self.nodes} nodes" if self.nodes > 1 else ""
        out += ", faiss-gpu" if self.faiss_gpu and self.gpus else ""
        return out + (", local executor" if self.executor == "local" else "")


@dataclass
class StageWork:
    """One row of the plan: a pipeline stage, or one part of it (`part`), with its work and wall time."""

    stage: str  # the pipeline's stage name (stages.json)
    part: str  # what of the stage this row is ("" = all of it)
    units: str  # what `count` counts
    count: int
    flop: float
    read: float  # bytes
    written: float  # bytes
    worker_mem: float  # bytes per worker
    seconds: float = 0.0
    where: str = ""  # which workers run it
    runs: bool = True  # False: shown for its cost but not run (exact_search off, or auto decided off)

    @property
    def label(self) -> str:
        return f"{self.stage}: {self.part}" if self.part else self.stage


@dataclass(frozen=True)
class Pools:
    """The workers a machine gives the executor (precompute.executor.pool_shape for Ray)."""

    gpus: int  # model / exact workers with a GPU each
    cpu_workers: int
    cores: int  # CPU cores of one CPU worker (it runs `threads` threads)
    driver: int  # cores of the driver
    nodes: int
    start: float  # seconds to start a pool (0 for the local executor)


def pools(cfg: RunConfig, m: Machine, rates: Rates) -> Pools:
    from precompute.executor import pool_shape

    nodes = max(1, m.nodes)
    driver = max(1, min(cfg.threads, m.cpus // nodes))
    if m.executor == "local":
        return Pools(min(m.gpus, 1), 1, max(1, min(m.cpus, cfg.threads)), driver, 1, 0.0)
    workers, _ = pool_shape([m.cpus / nodes] * nodes, cfg.threads)
    cores = max(1, min(m.cpus, workers * cfg.threads)) // workers
    return Pools(m.gpus, workers, max(1, cores), driver, nodes, rates.start_s)


def busiest(units: int, shard: int, workers: int) -> float:
    """Units the busiest worker of a map computes: shards are never split, so at least one whole shard."""
    return max(units / max(1, workers), min(units, shard)) if units else 0.0


def ivf(cfg: RunConfig) -> tuple[int, int]:
    """(nlist, PQ code bytes) of the index factory (nlist 1 without IVF; code = m bytes for PQm, 0 for Flat)."""
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", cfg.index_factory)) else 1
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", cfg.index_factory)
    code = int(pq.group(1)) * int(pq.group(2) or 8) // 8 if pq else 0
    return nlist, code


def train_parts(cfg: RunConfig, f: Facts) -> tuple[float, float]:
    """(coarse, PQ) k-means FLOP of training the index once: nlist centroids, then 256 per PQ sub-space."""
    nlist, _ = ivf(cfg)
    n_train = min(cfg.train_size or f.n, f.n)
    coarse = 2 * KMEANS_ITERS * f.shape.d * min(n_train, MAX_PER_CENTROID * nlist) * nlist if nlist > 1 else 0.0
    return coarse, 2 * KMEANS_ITERS * f.shape.d * min(n_train, 65536) * 256


def train_flop(cfg: RunConfig, f: Facts) -> float:
    """k-means FLOP of training the index once (coarse centroids + 256 PQ centroids per sub-space)."""
    return sum(train_parts(cfg, f))


def train_seconds(cfg: RunConfig, f: Facts, rates: Rates, cores: int) -> float:
    """Seconds of the index's k-means on `cores` driver cores: coarse at train_flops, PQ at pq_train_flops."""
    coarse, pq = train_parts(cfg, f)
    return (coarse / rates.train_flops + pq / rates.pq_train_flops) / cores


class Model:
    """The cost model of one run on one machine: the pieces each stage's work (precompute.stages.STAGES,
    `Stage.work`) is costed with. `exact_runs`: whether the run has the exact stage."""

    def __init__(self, cfg: RunConfig, f: Facts, rates: Rates, machine: Machine, exact_runs: bool = False):
        self.cfg, self.f, self.r, self.exact_runs = cfg, f, rates, exact_runs
        self.p = pools(cfg, machine, rates)
        self.d = f.shape.d
        self.nlist, code = ivf(cfg)
        self.code = code or self.d * 4  # a Flat index stores float32 vectors
        self.visits = cfg.nprobe * f.n / self.nlist  # codes scanned per query
        self.shard = cfg.shard_size
        self.wbytes = 2 if cfg.dtype in ("bfloat16", "float16") else 4
        self.keys_bytes = f.n * 2 * self.d  # fp16 keys
        self.cpu_where = f"{self.p.cpu_workers} CPU worker(s) x {self.p.cores} cores"
        self.faiss_gpu = machine.faiss_gpu and self.p.gpus > 0 and cfg.k <= 2048  # faiss-gpu selects k <= 2048

    # ------------------------------------------------------------ shared pieces

    def io(self, bytes_read: float, active: float) -> float:
        """Seconds to read `bytes_read` of keys from storage with `active` workers spread over the nodes."""
        return bytes_read / (max(1, min(self.p.nodes, math.ceil(active))) * self.r.read_bytes)

    def cpu_map(self, units: int, unit_s: float, key_bytes: float = 0.0) -> float:
        """Wall seconds of a CPU map: `unit_s` core-seconds per unit, shards of shard_size units, and
        `key_bytes` read from storage (overlapped with the compute: the larger of the two counts)."""
        active = min(self.p.cpu_workers, math.ceil(units / self.shard)) if units else 0
        compute = busiest(units, self.shard, self.p.cpu_workers) * unit_s / self.p.cores
        return max(compute, self.io(key_bytes, active))

    def model_map(self, stage: str, units: int, unit: str, flop: float, read: float, written: float,
                  head: bool) -> StageWork:
        """A map running the LM (GPU workers, else CPU workers): the model loaded once per worker."""
        f, r, p = self.f, self.r, self.p
        act = self.cfg.batch_size * (self.cfg.max_context or min(f.shape.positions, 1024)) * (4 * self.d + f.shape.ffn)
        mem = f.shape.params * self.wbytes + act * self.wbytes * 2 + (1024 * f.shape.vocab * 8 if head else 0)
        if p.gpus:
            rate, workers, where = r.gpu_flops, p.gpus, f"{p.gpus} GPU worker(s)"
        else:
            rate = p.cores * (r.cpu_head_flops if head else r.cpu_flops)
            workers, where = p.cpu_workers, self.cpu_where
        load = f.shape.params * self.wbytes / r.load_bytes
        seconds = flop / max(1, units) * busiest(units, self.shard, workers) / rate + load
        return StageWork(stage, "", unit, units, flop, read, written, mem, seconds, where)

    def forward(self, tokens: int, sq: int) -> float:
        return 2 * self.f.shape.body_params * tokens + 2 * self.f.shape.layers * self.d * sq

    def build(self, stage: str, part: str, transform: bool) -> StageWork:
        """Train an index on the driver and encode every key as a map (the run's factory; `transform`: keys
        whitened first, 2 d² FLOP each). With GPUs an IVFPQ index is encoded in torch on the GPU workers
        (precompute.stages.index.TORCH_ENCODER_DEVICES), else by faiss on the CPU workers."""
        cfg, f, r, d, p = self.cfg, self.f, self.r, self.d, self.p
        train = train_flop(cfg, f)
        n_train = min(cfg.train_size or f.n, f.n)
        extra = 2 * d * d if transform else 0
        flop = train + (2 * d * (self.nlist + 256) + extra) * f.n
        if self.faiss_gpu:
            train_s, trainer = train / r.gpu_encode_flops, "1 GPU (faiss-gpu)"
        else:
            train_s, trainer = train_seconds(cfg, f, r, p.driver), f"driver ({p.driver} cores)"
        if p.gpus and self.nlist > 1 and "PQ" in cfg.index_factory:
            per_key = (2 * d * (self.nlist + 256) + extra) / r.gpu_encode_flops
            mine = busiest(f.n, self.shard, p.gpus)
            encode_s = max(mine * per_key, self.io(self.keys_bytes, min(p.gpus, math.ceil(f.n / self.shard))))
            where = f"train: {trainer}; encode: {p.gpus} GPU worker(s) (torch)"
        else:
            per_key = (2 * d * self.nlist + extra) / r.flat_flops + 2 * d * 256 / r.encode_flops  # core-seconds
            encode_s = self.cpu_map(f.n, per_key, self.keys_bytes)
            where = f"train: {trainer}; encode: {self.cpu_where} (faiss)"
        mem = 2 * self.shard * d * 4 + (self.nlist + 256) * d * 4 + self.shard * (self.code + 8)
        written = f.n * (self.code + 8) * 2 + (16 * f.n if not transform else 0)  # codes + ids, twice; PQ errors
        return StageWork(stage, part, "keys", f.n, flop, self.keys_bytes + n_train * 2 * d, written, mem,
                         train_s + encode_s, where)
