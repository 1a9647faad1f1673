"""The one run configuration (SPEC §2 defaults): a frozen dataclass loaded from TOML.

Loaded once from a TOML file plus CLI overrides, validated once, and written whole into
the run's `manifest.json` and `run.config_json`. Relative corpus / model paths resolve
against the repository root when they exist there, so presets work from any directory.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """Every parameter a run depends on (all of it lands in the manifest)."""

    # --- model ---
    model: str = "data/models/demo-gpt2"  # hub name (e.g. gpt2-xl) or local HF directory
    tokenizer: str = ""  # tokenizer name / directory; "" = same as model
    dtype: str = "float32"  # float32 | bfloat16 | float16: forward-pass dtype (keys stored fp16)
    device: str = "auto"  # auto (cuda when a GPU is visible, else cpu) | cpu | cuda
    batch_size: int = 8  # windows per forward pass
    max_context: int = 0  # 0 = model's n_positions capped at 1024
    stride: int = 0  # 0 = max_context // 2
    # --- corpora ---
    datastore_corpus: str = "data/corpora/wikitext2-train.tokens.gz"
    datastore_limit_tokens: int = 0  # 0 = whole file
    eval_corpus: str = "data/corpora/wikitext2-test.raw.gz"
    eval_limit_tokens: int = 0  # 0 = whole file
    doc_block_tokens: int = 2048  # SPEC §11: text without ` = Title = ` articles: documents of this many positions
    eval_domain: str = ""  # in-domain | out-of-domain (of the eval text vs the LM's and datastore's); "" = unstated
    # --- index (SPEC §2) ---
    index_factory: str = "IVF4096,PQ64"  # faiss index_factory string (8-bit PQ codes)
    train_size: int = 262144  # keys sampled to train the index (0 = all)
    nprobe: int = 32
    k: int = 1024
    temperature: float = 10.0
    lam: float = 0.25  # λ; TOML / CLI name: "lambda"
    distance_source: str = "pq"  # pq | exact
    search_batch: int = 2048  # queries per faiss search call
    # --- stored detail ---
    store_neighbors: int = 64  # neighbours per evaluation position kept in DuckDB
    lm_top: int = 10  # LM top predictions kept per position
    contamination_search: str = "exact"  # exact | index (record which one was used)
    # Path, relative to the run directory, of another run's metrics.duckdb built on the same
    # datastore: this run then stores no datastore_tokens table of its own but reads that one's.
    datastore_tokens_from: str = ""
    exact_search: str = "auto"  # SPEC §8 exact search beside the index: on | off | auto (on up to exact_max_entries)
    exact_max_entries: int = 5_000_000  # auto: largest datastore searched exactly (cost ~ n_eval x n_entries x d)
    # --- mitigations (SPEC §9): evaluated beside the plain run when valid_corpus is set ---
    valid_corpus: str = ""  # validation text that τ and adaptive λ are fitted on; "" = no mitigations
    valid_limit_tokens: int = 0  # 0 = whole file
    whiten: str = "none"  # none | entries | zipfian | "entries,zipfian": whitened indexes built beside the plain one
    whiten_eps: float = 1e-6  # relative ε: ε = whiten_eps · trace(C) / d (the absolute ε is recorded)
    adaptive_bins: int = 8  # equal-population bins of the adaptive-λ features (fitted on validation)
    # --- execution ---
    shard_size: int = 131072  # keys / positions / queries per shard: the unit of work and of resume
    seed: int = 0
    threads: int = 2

    def validate(self) -> RunConfig:
        """Return self if consistent, else raise ConfigError naming the field and the fix."""
        checks = [
            (self.dtype in ("float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.shard_size >= 1, "shard_size must be >= 1"),
            (self.distance_source in ("pq", "exact"), "distance_source must be 'pq' or 'exact'"),
            (self.contamination_search in ("exact", "index"), "contamination_search must be 'exact' or 'index'"),
            (self.exact_search in ("auto", "on", "off"), "exact_search must be 'auto', 'on' or 'off'"),
            (self.eval_domain in ("", "in-domain", "out-of-domain"),
             "eval_domain must be 'in-domain', 'out-of-domain' or '' (unstated)"),
            (self.k >= 1, "k must be >= 1"),
            (self.nprobe >= 1, "nprobe must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (0.0 <= self.lam <= 1.0, "lambda must be in [0, 1]"),
            (0 <= self.store_neighbors, "store_neighbors must be >= 0"),
            (self.batch_size >= 1 and self.search_batch >= 1, "batch sizes must be >= 1"),
            (self.max_context == 0 or self.max_context >= 2, "max_context must be 0 (auto) or >= 2"),
            (self.stride >= 0, "stride must be >= 0 (0 = max_context // 2)"),
            (bool(self.model), "model must name a hub model or a local directory"),
            (all(w in ("entries", "zipfian") for w in self.whiten_kinds) and self.whiten.strip() != "",
             "whiten must be 'none', 'entries', 'zipfian' or 'entries,zipfian'"),
            (not self.whiten_kinds or bool(self.valid_corpus),
             "whiten needs valid_corpus (τ of a whitened index is chosen on it), e.g. "
             "valid_corpus = \"data/corpora/wikitext2-valid.raw.gz\""),
            (self.whiten_eps > 0, "whiten_eps must be > 0"),
            (self.adaptive_bins >= 1, "adaptive_bins must be >= 1"),
            (self.doc_block_tokens >= 1, "doc_block_tokens must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid config: {message}")
        return self

    @property
    def store_neighbors_effective(self) -> int:
        """Neighbours actually stored: never more than k."""
        return min(self.store_neighbors, self.k)

    @property
    def whiten_kinds(self) -> tuple[str, ...]:
        """The whitened variants to build, in the order named ("none" = none)."""
        parts = [w.strip() for w in self.whiten.split(",") if w.strip()]
        return () if parts == ["none"] else tuple(dict.fromkeys(parts))

    def exact_search_enabled(self, n_entries: int) -> bool:
        """Whether the exact-search stage runs for a datastore of n_entries."""
        return self.exact_search == "on" or (self.exact_search == "auto" and n_entries <= self.exact_max_entries)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the TOML spelling ('lambda')."""
        data = asdict(self)
        data["lambda"] = data.pop("lam")
        return data


def _normalise(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Map TOML / CLI spellings onto field names and reject unknown keys."""
    data = dict(data)
    if "lambda" in data:
        data["lam"] = data.pop("lambda")
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys in {source}: {unknown} (check spelling; see configs/*.toml)")
    return data


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """RunConfig from a TOML file plus non-None overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (see configs/ for presets)")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config {path} is not valid TOML: {err}") from err
        data = _normalise(data, str(path))
    cfg = RunConfig(**data)
    extra = _normalise({k: v for k, v in (overrides or {}).items() if v is not None}, "overrides")
    try:
        return replace(cfg, **extra).validate()
    except TypeError as err:  # e.g. k = "64": a value of the wrong type
        raise ConfigError(f"invalid config: a value has the wrong type ({err}); compare with configs/*.toml") from err


def resolve_path(value: str) -> Path:
    """A config path: absolute as is; relative to the repo root if it exists there, else to cwd."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p.resolve()
