"""The Probe (SPEC §13): score any text with a run's own model, index and settings.

The text is tokenized line by line and windowed exactly like an evaluation corpus (SPEC §1:
`knnlm_core.corpus.tokenize_text`, `knnlm_core.windows.plan_windows` with the run's max_context and
stride, the run's batch grid), its queries and p_LM come from the run's extraction code
(`precompute.extract.extract`), the queries are searched on the run's `index.faiss` at its nprobe and
k (`precompute.search.search_rows`: PQ and exact distances), and every SPEC §4 / §12 per-position
metric is computed with the functions the pipeline uses (`knnlm_core.knn`, `knnlm_core.infgram` over
the run's suffix array). A passage of the run's evaluation text that starts at its beginning therefore
gives the run's `eval_tokens` values for those positions (up to float reduction order: see
docs/PROBE.md); a passage scored alone has its context start at the text.

Use:
    from precompute import probe
    df = probe.probe("runs/my-run", "Some text to score.")      # one row per position, eval_tokens columns
    p = probe.load("runs/my-run")                               # once per process (model, index, datastore)
    res = p.score("Some text to score.")                        # res.tokens (DataFrame), res.neighbours
    probe.rescore(p, res, tau=5.0)                              # What-if: no second search
    probe.neighbour_table(p, res, pos=3)                        # one position's neighbours with contexts

Columns left NaN: `recall_16/64/1024`, `p_knn_exact`, `exact_target_rank` (SPEC §8: they need an exact
search over every key, which a probe does not run) and `doc_id` (probed text is one document).
Nothing is written to the run: every file is opened read-only (the index memory-mapped read-only).
This module imports torch, transformers and faiss only inside `load` / `score`, so the dashboard can
import it to ask what a run lacks (`missing_files`, `missing_packages`).
"""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from knnlm_core import infgram, knn
from knnlm_core.bins import freq_bin
from knnlm_core.config import RunConfig, resolve_path
from knnlm_core.store import HIT_KS, RECALL_KS

MAX_TOKENS = 2000  # longest probe (tokens): the page shows this limit
SOURCES = ("pq", "exact")
PACKAGES = ("torch", "transformers", "faiss")  # what the probe needs beyond the dashboard's install
INSTALL = "pip install -r requirements.txt -r requirements-precompute.txt"
# Files of a run the probe reads (besides the model directory); keys: either layout of SPEC §7.
NEEDED = ("manifest.json", "index.faiss", "values.npy", "datastore_ids.npy", "suffix_array.npy", "suffix_array.json")
KEY_FILES = ("keys/shards.json", "keys.npy")
SEARCH_BATCH = 2048  # queries per faiss call (the probe is at most MAX_TOKENS queries)


class ProbeError(ValueError):
    """The text cannot be probed (empty, too long) or the run lacks what a probe needs; one line, the fix named."""


# ---------------------------------------------------------------- what a run / install lacks (no torch needed)

def missing_packages() -> list[str]:
    """The packages the probe needs that are not installed (the dashboard's light install lacks them)."""
    return [name for name in PACKAGES if not _importable(name)]


def _importable(name: str) -> bool:
    """Whether `name` can be imported here, without importing it (a None entry in sys.modules: blocked)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_files(run_dir: str | Path) -> list[str]:
    """Files of the run directory a probe needs that are absent (shipped runs keep only the database)."""
    run_dir = Path(run_dir)
    missing = [name for name in NEEDED if not (run_dir / name).is_file()]
    if not any((run_dir / name).is_file() for name in KEY_FILES):
        missing.append("keys/ (keys/shards.json and its shards)")
    if (run_dir / "manifest.json").is_file():
        model = model_dir(read_manifest(run_dir))
        if model is not None and not (model / "config.json").is_file():
            missing.append(f"the model directory {model}")
    return missing


def read_manifest(run_dir: str | Path) -> dict:
    """The run's manifest.json; ProbeError when it is missing or unreadable."""
    path = Path(run_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ProbeError(f"{path} is missing or unreadable ({type(err).__name__}): the run cannot be probed") from None


def model_dir(manifest: dict) -> Path | None:
    """The local directory of the run's model, or None for a hub name."""
    name = str((manifest.get("config") or {}).get("model") or manifest.get("model") or "")
    path = resolve_path(name)
    local = path.is_dir() or Path(name).is_absolute() or name.startswith((".", "~")) or \
        ("/" in name and resolve_path(name.split("/")[0]).is_dir())
    return path if name and local else None  # else a hub name (org/name): loaded from the HF cache


def run_config(manifest: dict) -> RunConfig:
    """The run's RunConfig from its manifest (fields this version does not know are dropped)."""
    data = dict(manifest.get("config") or {})
    data["lam"] = data.pop("lambda", RunConfig.lam)
    known = RunConfig.__dataclass_fields__
    return RunConfig(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------- the loaded run (once per process, shared)

@dataclass
class Probe:
    """A run's model, tokenizer, index, keys, values and datastore stream, loaded once and shared by threads.

    Arrays are memory-mapped read-only and never mutated; the model forward and the index search run under
    `lock` (torch's thread setting and the index's nprobe are process-wide state).
    """

    run_dir: Path
    cfg: RunConfig
    manifest: dict
    lm: Any  # knnlm_core.model.LoadedModel
    tokenizer: Any
    index: Any  # faiss index, nprobe = the run's
    keys: Any  # (N, d) float16 array-like (knnlm_core.keystore)
    values: np.ndarray  # (N,) int32 value of entry i
    ids_d: np.ndarray  # (N + 1,) datastore token stream
    sa: np.ndarray  # (N + 1,) suffix array of ids_d
    type_freq: np.ndarray  # (V,) int64 freq(v) = entries whose value is v (SPEC §3)
    max_context: int
    stride: int
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    text_of: dict[int, str] = field(default_factory=dict, repr=False)  # token id -> decoded text (grows)

    @property
    def k(self) -> int:
        return int(self.cfg.k)

    def decode(self, ids) -> list[str]:
        """Readable text of each token id, as the database's `vocab` decodes it (cached)."""
        out = []
        for i in np.asarray(ids, dtype=np.int64).tolist():
            if i not in self.text_of:
                self.text_of[i] = self.tokenizer.decode([i]) if i >= 0 else ""
            out.append(self.text_of[i])
        return out

    def score(self, text: str, *, k: int | None = None, tau: float | None = None, lam: float | None = None,
              nprobe: int | None = None, source: str | None = None) -> ProbeResult:
        """Probe `text` (see the module docstring); the run's settings where an argument is None."""
        return score(self, text, k=k, tau=tau, lam=lam, nprobe=nprobe, source=source)


def load(run_dir: str | Path, device: str | None = None) -> Probe:
    """Load what a probe of the run needs (ProbeError naming what is missing and the fix)."""
    if missing := missing_packages():
        raise ProbeError(f"the probe needs {', '.join(missing)}: install them with `{INSTALL}`")
    run_dir = Path(run_dir)
    if missing := missing_files(run_dir):
        raise ProbeError(f"{run_dir} lacks what a probe needs: {', '.join(missing)}")
    manifest = read_manifest(run_dir)
    cfg = run_config(manifest)
    check_model(cfg, run_dir, manifest)
    from knnlm_core.corpus import load_tokenizer
    from knnlm_core.keystore import open_keys
    from knnlm_core.model import load_model
    from precompute.runner import model_source
    from precompute.search import open_index

    n, d = int(manifest["n_entries"]), int(manifest["key_dim"])
    lm = load_model(str(model_source(cfg.model)), cfg.dtype, device or _device(manifest))
    tokenizer = load_tokenizer(str(model_source(cfg.tokenizer or cfg.model)))
    index = open_index(run_dir / "index.faiss", d, mmap=True)
    _set_nprobe(index, cfg.nprobe)
    values = np.load(run_dir / "values.npy", mmap_mode="r")
    ids_d = np.load(run_dir / "datastore_ids.npy", mmap_mode="r")
    sa = np.load(run_dir / "suffix_array.npy", mmap_mode="r")
    if len(values) != n or len(ids_d) != n + 1 or len(sa) != n + 1:
        raise ProbeError(f"{run_dir}: values.npy, datastore_ids.npy and suffix_array.npy do not match the manifest's "
                         f"{n:,} entries: rebuild the run")
    vocab = max(len(tokenizer), int(np.max(values)) + 1)
    return Probe(run_dir=run_dir, cfg=cfg, manifest=manifest, lm=lm, tokenizer=tokenizer, index=index,
                 keys=open_keys(run_dir, n, d), values=values, ids_d=ids_d, sa=sa,
                 type_freq=np.bincount(np.asarray(values), minlength=vocab).astype(np.int64),
                 max_context=int(manifest["max_context"]), stride=int(manifest["stride"]))


def check_model(cfg: RunConfig, run_dir: Path, manifest: dict) -> None:
    """ProbeError when the model's files are not the ones the run was built with (its fingerprint)."""
    want = manifest.get("model_fingerprint")
    if not want:
        return
    from knnlm_core.model import ModelError, source_fingerprint
    from precompute.runner import model_source

    source = model_source(cfg.model)
    if Path(source).is_dir():  # the run's own cache of the fingerprint by file size and mtime, read only
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(source).glob("*") if p.is_file())
        try:
            cached = json.loads((run_dir / "model_fingerprint.json").read_text())
            if cached.get("stats") == json.loads(json.dumps(stats)) and cached.get("fingerprint") == want:
                return
        except (OSError, ValueError):
            pass
    try:
        got = source_fingerprint(str(source))
    except ModelError as err:
        raise ProbeError(str(err)) from None
    if got != want:
        raise ProbeError(f"the model files at {cfg.model} changed since {run_dir} was built (fingerprint differs): "
                         "probing them would not give the run's numbers; rebuild the run")


def _device(manifest: dict) -> str:
    """The device the run was built on when it is available here, else cpu."""
    if manifest.get("device") == "cuda":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def _set_nprobe(index, nprobe: int) -> None:
    from knnlm_core.index import set_nprobe

    set_nprobe(index, int(nprobe))


# ---------------------------------------------------------------- scoring

@dataclass(frozen=True)
class Neighbours:
    """The searched neighbours of every probed position, all k_max of them in rank order (missing: -1 / inf)."""

    ids: np.ndarray  # (T, k_max) int64 entry ids
    values: np.ndarray  # (T, k_max) int32 value tokens
    dist_pq: np.ndarray  # (T, k_max) float32 index (PQ) squared L2
    dist_exact: np.ndarray  # (T, k_max) float32 exact squared L2 from the stored keys


@dataclass(frozen=True)
class ProbeResult:
    """A probe: the token stream, the per-position table (eval_tokens columns) and the searched neighbours."""

    ids: np.ndarray  # (T + 1,) int32 the text's token stream
    tokens: pd.DataFrame  # (T rows) pos, token_id, token, ..., as eval_tokens
    neighbours: Neighbours
    settings: dict  # k, tau, lam, nprobe, source used for the table; k_max searched


def tokenize(probe: Probe, text: str) -> np.ndarray:
    """The text's token ids as an evaluation corpus gets them; ProbeError for empty or over-long text."""
    from knnlm_core.corpus import tokenize_text

    if not isinstance(text, str) or not text.strip():
        raise ProbeError("nothing to score: the text is empty")
    if len(text) > 40 * MAX_TOKENS:  # no tokenizer call on megabytes of text
        raise ProbeError(f"the text is too long: {len(text):,} characters, the probe takes at most {MAX_TOKENS:,} tokens")
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates (no UTF-8 form) become "?"
    ids = tokenize_text(text, probe.tokenizer)
    if len(ids) > MAX_TOKENS:
        raise ProbeError(f"the text is too long: {len(ids):,} tokens, the probe takes at most {MAX_TOKENS:,}")
    if len(ids) < 2:
        raise ProbeError("nothing to score: the text has fewer than 2 tokens (a token is scored from the ones before)")
    return ids


def _settings(probe: Probe, k, tau, lam, nprobe, source, k_max: int | None = None) -> dict:
    """The settings of a probe, the run's where None, checked (ProbeError)."""
    s = {"k": int(k if k is not None else probe.k), "tau": float(tau if tau is not None else probe.cfg.temperature),
         "lam": float(lam if lam is not None else probe.cfg.lam),
         "nprobe": int(nprobe if nprobe is not None else probe.cfg.nprobe),
         "source": source if source is not None else probe.cfg.distance_source}
    top = k_max if k_max is not None else max(s["k"], probe.k)
    if not 1 <= s["k"] <= min(top, len(probe.values)):
        raise ProbeError(f"k must be in 1..{min(top, len(probe.values)):,}, got {s['k']}")
    if not (s["tau"] > 0 and np.isfinite(s["tau"])):
        raise ProbeError(f"τ must be a positive number, got {s['tau']}")
    if not 0.0 <= s["lam"] <= 1.0:
        raise ProbeError(f"λ must be in 0..1, got {s['lam']}")
    if s["nprobe"] < 1:
        raise ProbeError(f"nprobe must be >= 1, got {s['nprobe']}")
    if s["source"] not in SOURCES:
        raise ProbeError(f"source must be one of {', '.join(SOURCES)}, got {s['source']!r}")
    s["k_max"] = int(top)
    return s


def _forward(probe: Probe, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(queries (T, d) float16, p_LM (T,)) of every position, with the run's windows and batch grid."""
    from knnlm_core.windows import plan_windows
    from precompute.extract import LMOutputs, extract

    windows = plan_windows(len(ids), probe.max_context, probe.stride)
    t, d, top = len(ids) - 1, probe.lm.dim, probe.cfg.lm_top
    queries = np.empty((t, d), dtype=np.float16)  # (T, d)
    out = LMOutputs(np.empty(t), np.empty((t, top), np.int32), np.empty((t, top), np.float32))
    extract(probe.lm, ids, windows, queries, probe.cfg.batch_size, out, threads=probe.cfg.threads)
    return queries, out.p_lm


def _search(probe: Probe, queries: np.ndarray, k: int, nprobe: int) -> tuple[Neighbours, np.ndarray]:
    """(the index's k neighbours of every query with PQ and exact distances, each query's PQ error)."""
    from knnlm_core.index import reconstruction_error
    from precompute.search import search_rows

    _set_nprobe(probe.index, nprobe)
    try:
        block = search_rows(probe.index, probe.keys, probe.values, queries, 0, len(queries), k, SEARCH_BATCH)
    finally:
        _set_nprobe(probe.index, probe.cfg.nprobe)
    error = reconstruction_error(probe.index, np.asarray(queries, dtype=np.float32))
    return Neighbours(block["ids"], block["values"], block["dist_pq"], block["dist_exact"]), error


def score(probe: Probe, text: str, *, k: int | None = None, tau: float | None = None, lam: float | None = None,
          nprobe: int | None = None, source: str | None = None) -> ProbeResult:
    """Probe `text` with the run's model and index (the run's settings where an argument is None)."""
    ids = tokenize(probe, text)
    s = _settings(probe, k, tau, lam, nprobe, source)
    with probe.lock:  # torch's thread setting and the index's nprobe are process-wide
        queries, p_lm = _forward(probe, ids)
        nb, pq_error = _search(probe, queries, s["k_max"], s["nprobe"])
    base = _base_columns(probe, ids, p_lm, pq_error)
    return ProbeResult(ids=ids, tokens=_with_knn(probe, base, ids, nb, s), neighbours=nb, settings=s)


def rescore(probe: Probe, result: ProbeResult, *, k: int | None = None, tau: float | None = None,
            lam: float | None = None, source: str | None = None) -> ProbeResult:
    """The What-if: `result` re-scored at other k (<= the k searched), τ, λ or distance source from its
    searched neighbours, without running the model or the index again."""
    old = result.settings
    s = _settings(probe, old["k"] if k is None else k, old["tau"] if tau is None else tau,
                  old["lam"] if lam is None else lam, old["nprobe"], old["source"] if source is None else source,
                  k_max=old["k_max"])
    base = result.tokens[BASE_COLUMNS]
    return replace(result, tokens=_with_knn(probe, base, result.ids, result.neighbours, s), settings=s)


def probe(run_dir: str | Path, text: str, *, k: int | None = None, tau: float | None = None, lam: float | None = None,
          nprobe: int | None = None, source: str | None = None) -> pd.DataFrame:
    """Per-position table (eval_tokens columns) of `text` scored with the run in `run_dir` (loaded once per
    process and run directory). For the neighbours and the What-if, use `load(run_dir).score(text)`."""
    return cached(run_dir).score(text, k=k, tau=tau, lam=lam, nprobe=nprobe, source=source).tokens


_LOADED: dict[Path, Probe] = {}
_LOADING = threading.Lock()


def cached(run_dir: str | Path) -> Probe:
    """`load(run_dir)` once per process and resolved run directory."""
    key = Path(run_dir).resolve()
    with _LOADING:
        if key not in _LOADED:
            _LOADED[key] = load(key)
        return _LOADED[key]


# ---------------------------------------------------------------- the columns

BASE_COLUMNS = ["pos", "token_id", "token", "freq", "freq_bin", "p_lm", "nll_lm", "query_pq_error", "context_freq",
                "context_token_id", "ctx_match_len", "p_inf", "inf_suffix_len", "inf_count"]


def _base_columns(probe: Probe, ids: np.ndarray, p_lm: np.ndarray, pq_error: np.ndarray) -> pd.DataFrame:
    """Columns that depend on neither k, τ, λ nor the distance source (SPEC §1, §3, §4, §12)."""
    targets, context = ids[1:].astype(np.int64), ids[:-1].astype(np.int64)
    freq = _freq(probe, targets)
    inf = infgram.infgram(probe.sa, probe.ids_d, ids, np.arange(len(targets)), probe.cfg.ctx_max_len)
    with np.errstate(divide="ignore"):
        nll_lm = -np.log(p_lm)
    return pd.DataFrame({
        "pos": np.arange(len(targets), dtype=np.int32), "token_id": targets.astype(np.int32),
        "token": probe.decode(targets), "freq": freq, "freq_bin": freq_bin(freq), "p_lm": p_lm, "nll_lm": nll_lm,
        "query_pq_error": pq_error, "context_freq": _freq(probe, context), "context_token_id": context.astype(np.int32),
        "ctx_match_len": inf.ctx_match_len, "p_inf": inf.p_inf, "inf_suffix_len": inf.inf_suffix_len,
        "inf_count": inf.inf_count,
    })


def _freq(probe: Probe, ids: np.ndarray) -> np.ndarray:
    """freq(v) (SPEC §3) of token ids; 0 for ids beyond the datastore's values."""
    inside = ids < len(probe.type_freq)
    return np.where(inside, probe.type_freq[np.where(inside, ids, 0)], 0).astype(np.int64)


def knn_columns(nb: Neighbours, targets: np.ndarray, k: int, tau: float, source: str) -> dict[str, np.ndarray]:
    """p_kNN, the target's rank and count, log Z and the weights (SPEC §2, §4) from the first k neighbours."""
    vals = nb.values[:, :k]
    dists = (nb.dist_exact if source == "exact" else nb.dist_pq)[:, :k]
    rank, n_target = knn.target_stats(vals, targets)
    weights, log_z = knn.softmax_weights(dists, tau, vals)  # (T, k), (T,)
    p_ivf = {name: knn.p_knn_of(col[:, :k], vals, targets, tau) for name, col in
             (("p_knn_ivf_pq", nb.dist_pq), ("p_knn_ivf_exact", nb.dist_exact))}
    return {"p_knn": knn.p_knn_from_weights(weights, vals, targets), "rank": rank, "n_target": n_target,
            "knn_log_z": log_z, "weights": weights, **p_ivf}


def _with_knn(probe: Probe, base: pd.DataFrame, ids: np.ndarray, nb: Neighbours, s: dict) -> pd.DataFrame:
    """`base` with every column that depends on k, τ, λ or the distance source, in eval_tokens order."""
    targets = ids[1:].astype(np.int64)
    k, lam = s["k"], s["lam"]
    c = knn_columns(nb, targets, k, s["tau"], s["source"])
    p_lm, p_knn = base["p_lm"].to_numpy(), c["p_knn"]
    p_knnlm = knn.interpolate(p_lm, p_knn, lam)
    with np.errstate(divide="ignore"):
        nll_knnlm = -np.log(p_knnlm)
    out = base[["pos", "token_id", "token", "freq", "freq_bin", "p_lm"]].copy()
    out["p_knn"], out["p_knnlm"] = p_knn, p_knnlm
    out["nll_lm"], out["nll_knnlm"] = base["nll_lm"].to_numpy(), nll_knnlm
    out["gain"] = out["nll_lm"] - nll_knnlm
    rank = c["rank"]
    for hk in HIT_KS:  # SPEC §4: NULL for k above the k used
        hit = (rank > 0) & (rank <= hk)
        out[f"hit_{hk}"] = pd.array(hit, dtype="boolean") if hk <= k else pd.array([pd.NA] * len(out), "boolean")
    target_rank = pd.array(rank, dtype="Int32")
    target_rank[rank <= 0] = pd.NA
    out["target_rank"], out["n_target"] = target_rank, c["n_target"]
    for name in ("query_pq_error", "context_freq", "context_token_id"):
        out[name] = base[name].to_numpy()
    out["knn_log_z"] = c["knn_log_z"]
    for hk in RECALL_KS:
        out[f"recall_{hk}"] = np.nan  # SPEC §8: needs an exact search over every key, not run by a probe
    out["p_knn_ivf_pq"], out["p_knn_ivf_exact"] = c["p_knn_ivf_pq"], c["p_knn_ivf_exact"]
    out["p_knn_exact"] = np.nan
    out["exact_target_rank"] = pd.array([pd.NA] * len(out), dtype="Int32")
    for name in ("ctx_match_len", "p_inf", "inf_suffix_len", "inf_count"):
        out[name] = base[name].to_numpy()
    share = _copy_share(probe, ids, nb, targets, k, c["weights"])
    out["copy_share"] = pd.array(np.where(np.isnan(share), None, share), dtype="Float64")  # NULL: p_kNN = 0
    return out


def _copy_share(probe: Probe, ids: np.ndarray, nb: Neighbours, targets: np.ndarray, k: int,
                weights: np.ndarray) -> np.ndarray:
    """SPEC §12 copy share over the first k neighbours (overlap computed for the target's carriers only)."""
    vals = nb.values[:, :k]
    carriers = np.where(vals == targets[:, None], nb.ids[:, :k], -1)
    overlap = infgram.neighbour_overlap(probe.ids_d, ids, np.arange(len(targets)), carriers, probe.cfg.ctx_max_len)
    return infgram.copy_share(weights, vals, targets, overlap)


# ---------------------------------------------------------------- one position's neighbours (the neighbour view)

def neighbour_table(probe: Probe, result: ProbeResult, pos: int, shown: int = 12, width: int = 12) -> pd.DataFrame:
    """The first `shown` neighbours of probed position `pos` (of the k used): rank, entry, token_id, token,
    distance_pq, distance_exact, overlap (with the probed context, SPEC §12), copy, hit, weight_in_p_knn
    (its share of the table's p_kNN), context (its last `width` datastore tokens) and `tokens` (those as a
    list, oldest first, for the overlap highlight)."""
    s, nb = result.settings, result.neighbours
    if not 0 <= pos < len(result.tokens):
        raise ProbeError(f"position {pos} is not in this probe (0..{len(result.tokens) - 1})")
    m = min(shown, s["k"])
    entry = nb.ids[pos, :m]
    keep = entry >= 0
    entry = entry[keep]
    dists = (nb.dist_exact if s["source"] == "exact" else nb.dist_pq)[pos, :m][keep].astype(np.float64)
    log_z = float(result.tokens["knn_log_z"].iloc[pos])
    overlap = infgram.neighbour_overlap(probe.ids_d, result.ids, np.array([pos]), entry[None, :],
                                        probe.cfg.ctx_max_len)[0] if len(entry) else np.zeros(0, np.int32)
    contexts = [probe.decode(probe.ids_d[max(0, e - width + 1): e + 1]) for e in entry.tolist()]
    value = nb.values[pos, :m][keep]
    return pd.DataFrame({
        "rank": np.flatnonzero(keep) + 1, "entry": entry, "token_id": value, "token": probe.decode(value),
        "distance_pq": nb.dist_pq[pos, :m][keep], "distance_exact": nb.dist_exact[pos, :m][keep],
        "overlap": overlap, "copy": overlap >= infgram.COPY_MIN_OVERLAP,
        "hit": value == int(result.tokens["token_id"].iloc[pos]),
        "weight_in_p_knn": np.exp(-dists / s["tau"] - log_z), "context": ["".join(c) for c in contexts],
        "tokens": contexts,
    })
