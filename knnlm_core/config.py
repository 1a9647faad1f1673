"""The one run configuration (SPEC §2 defaults): a frozen dataclass loaded from TOML.

Loaded once from a TOML file plus CLI overrides, validated once, and written whole into
the run's `manifest.json` and `run.config_json`. Relative corpus / model paths resolve
against the repository root when they exist there, so presets work from any directory.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

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
    # "knn-transformers:DIR": check the datastore in DIR against the model and datastore_corpus (the text that
    # built it) and use it (and its index when DIR holds one) instead of extracting keys (docs/IMPORT.md)
    import_datastore: str = ""
    # SPEC §8 exact search beside the index: on | off | auto (on when the plan's estimate for the machine at hand
    # is small: precompute.plan.startup.decide_exact; the run records the decision and why)
    exact_search: str = "auto"
    ctx_max_len: int = 64  # SPEC §12: cap on the context match length and the ∞-gram suffix (tokens)
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

    def validate(self, origin: dict[str, str] | None = None) -> RunConfig:
        """Return self if every field has its type and range and the fields agree, else raise one
        ConfigError line naming the field, its value, what is allowed and the fix.

        `origin` maps a field to where its value came from (a TOML path or a CLI flag).
        """
        origin = origin or {}
        for f in fields(self):
            value = getattr(self, f.name)
            check_type(f.name, value, FIELD_TYPES[f.name], origin.get(f.name))
            if f.name in RULES:
                RULES[f.name].check(f.name, value, origin.get(f.name))
        for names, problem in cross_field_problems(self):
            where = "; ".join(f"{n} from {origin[n]}" for n in names if n in origin)
            raise ConfigError(f"invalid config: {problem}" + (f" ({where})" if where else ""))
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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the TOML spelling ('lambda'); an empty import_datastore is left out, so native runs'
        records (manifest, stage keys) stay as they were before the field existed."""
        data = asdict(self)
        data["lambda"] = data.pop("lam")
        if not data["import_datastore"]:
            del data["import_datastore"]
        return data


# ---------------------------------------------------------------- schema: types, ranges, cross-field rules

FIELD_TYPES: dict[str, type] = get_type_hints(RunConfig)  # field -> int | float | str, from the annotations
C_INT_MAX = 2**31 - 1  # counts that reach faiss / torch as C ints
BIG_INT = 2**62  # token and entry counts (int64 with headroom)
SEARCH_RESULT_BYTES_MAX = 4 << 30  # search_batch x k x (float32 distance + int64 id) per faiss call


def _show(value: Any) -> str:
    """A value as one short line (repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(name: str, value: Any, allowed: str, fix: str, where: str | None) -> ConfigError:
    spelled = "lambda" if name == "lam" else name
    src = f" (from {where})" if where else ""
    return ConfigError(f"invalid config: {spelled} = {_show(value)}{src}: allowed: {allowed}; fix: {fix}")


_TYPE_WORDS = {int: "an integer (no quotes, no decimal point)", float: "a finite number",
               str: "a quoted string without NUL characters"}


def type_ok(value: Any, typ: type) -> bool:
    """Whether `value` has the field type `typ`: bool is no int, an int is a float, floats are finite."""
    if isinstance(value, bool):
        return typ is bool
    if typ is int:
        return isinstance(value, int)
    if typ is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if typ is str:
        return isinstance(value, str) and "\x00" not in value
    return isinstance(value, typ)


def check_type(name: str, value: Any, typ: type, where: str | None = None) -> None:
    """ConfigError unless `value` has the type the dataclass annotation of `name` declares."""
    if not type_ok(value, typ):
        example = getattr(RunConfig, name)
        raise _fail(name, value, _TYPE_WORDS.get(typ, typ.__name__), f"write it like the default, "
                    f"{'lambda' if name == 'lam' else name} = {example!r}".replace("'", '"'), where)


@dataclass(frozen=True)
class Rule:
    """What one field allows beyond its type: a range (0 optionally meaning "auto"), choices or non-empty."""

    lo: float | None = None  # smallest value allowed (inclusive unless lo_open)
    hi: float | None = None  # largest value allowed (inclusive)
    lo_open: bool = False  # lo itself is excluded (temperature > 0)
    zero_ok: bool = False  # 0 is allowed besides [lo, hi] (0 = auto / whole file)
    choices: tuple[str, ...] = ()
    nonempty: bool = False
    fix: str = ""  # what to do, beyond "choose an allowed value"

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.nonempty:
            return "a non-empty string"
        low = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        high = "" if self.hi is None else f"<= {_num(self.hi)}"
        rng = " and ".join(x for x in (low, high) if x) or "any value"
        return ("0 or " + rng) if self.zero_ok else rng

    def ok(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.nonempty:
            return bool(value.strip())
        if self.zero_ok and value == 0:
            return True
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        return above and (self.hi is None or value <= self.hi)

    def check(self, name: str, value: Any, where: str | None = None) -> None:
        if not self.ok(value):
            raise _fail(name, value, self.allowed(), self.fix or "choose an allowed value", where)


def _num(x: float) -> str:
    """A bound as people write it: 1,048,576 rather than 1.04858e+06."""
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _count(lo: int, hi: int = C_INT_MAX, fix: str = "") -> Rule:
    return Rule(lo=lo, hi=hi, fix=fix)


# Every field of RunConfig, by what it allows (tests/test_config.py asserts none is missing).
RULES: dict[str, Rule] = {
    "model": Rule(nonempty=True, fix='a hub name such as "gpt2-xl" or a local model directory'),
    "tokenizer": Rule(fix='"" (the model\'s own) or a tokenizer directory'),
    "dtype": Rule(choices=("float32", "bfloat16", "float16")),
    "device": Rule(choices=("auto", "cpu", "cuda")),
    "batch_size": _count(1, 1 << 16, "windows per forward pass, e.g. 8"),
    "max_context": Rule(lo=2, hi=1 << 20, zero_ok=True, fix="0 = the model's n_positions capped at 1024"),
    "stride": Rule(lo=1, hi=1 << 20, zero_ok=True, fix="0 = max_context // 2"),
    "datastore_corpus": Rule(nonempty=True, fix="a text file, e.g. data/corpora/wikitext2-train.tokens.gz"),
    "datastore_limit_tokens": Rule(lo=2, hi=BIG_INT, zero_ok=True, fix="0 = the whole file"),
    "eval_corpus": Rule(nonempty=True, fix="a text file, e.g. data/corpora/wikitext2-test.raw.gz"),
    "eval_limit_tokens": Rule(lo=2, hi=BIG_INT, zero_ok=True, fix="0 = the whole file"),
    "doc_block_tokens": _count(1, BIG_INT, "positions per document of text without articles, e.g. 2048"),
    "eval_domain": Rule(choices=("", "in-domain", "out-of-domain"), fix='"" leaves it unstated'),
    "index_factory": Rule(nonempty=True, fix="e.g. IVF4096,PQ64"),
    "train_size": Rule(lo=1, hi=BIG_INT, zero_ok=True, fix="0 = train on all keys"),
    "nprobe": _count(1, 1 << 24, "inverted lists visited per query, e.g. 32"),
    "k": _count(1, 1 << 20, "neighbours per query, e.g. 1024"),
    "temperature": Rule(lo=0, hi=1e12, lo_open=True, fix="τ > 0, e.g. 10"),
    "lam": Rule(lo=0, hi=1, fix="λ in [0, 1], e.g. 0.25"),
    "distance_source": Rule(choices=("pq", "exact")),
    "search_batch": _count(1, 1 << 24, "queries per faiss call, e.g. 2048"),
    "store_neighbors": Rule(lo=0, hi=C_INT_MAX, fix="neighbours kept per position, e.g. 64"),
    "lm_top": _count(1, 1000, "LM top predictions kept per position, e.g. 10"),
    "contamination_search": Rule(choices=("exact", "index")),
    "datastore_tokens_from": Rule(fix='"" or the path of another run\'s metrics.duckdb'),
    "import_datastore": Rule(fix='"" or "knn-transformers:DIR": point it at the knn-transformers dstore_dir'),
    "exact_search": Rule(choices=("auto", "on", "off")),
    "ctx_max_len": _count(1, 1 << 16, "tokens, e.g. 64"),
    "valid_corpus": Rule(fix='"" = no mitigations, or a text file'),
    "valid_limit_tokens": Rule(lo=2, hi=BIG_INT, zero_ok=True, fix="0 = the whole file"),
    "whiten": Rule(nonempty=True, fix='"none", "entries", "zipfian" or "entries,zipfian"'),  # parts: below
    "whiten_eps": Rule(lo=0, hi=1, lo_open=True, fix="relative ε, e.g. 1e-6"),
    "adaptive_bins": _count(1, 1000, "e.g. 8"),
    "shard_size": _count(1, C_INT_MAX, "keys per shard, e.g. 131072"),
    "seed": Rule(lo=0, hi=C_INT_MAX, fix="a fixed seed >= 0 (a negative one lets faiss pick a random seed, so one "
                                         "config would give two results)"),
    "threads": _count(1, 1024, "CPU threads, e.g. 2"),
}


def cross_field_problems(cfg: RunConfig) -> list[tuple[tuple[str, ...], str]]:
    """(fields involved, one-line problem) for each rule between fields that `cfg` breaks."""
    from knnlm_core.factory import FactoryError, parse_factory, training_problem

    out: list[tuple[tuple[str, ...], str]] = []
    try:
        parse_factory(cfg.index_factory)
    except FactoryError as err:
        return [(("index_factory",), str(err))]
    if not all(w in ("entries", "zipfian") for w in cfg.whiten_kinds):
        out.append((("whiten",), f"whiten must be 'none', 'entries', 'zipfian' or 'entries,zipfian', not "
                    f"{_show(cfg.whiten)}; fix: one of those"))
    if cfg.max_context and cfg.stride > cfg.max_context:
        out.append((("stride", "max_context"), f"stride {cfg.stride} exceeds max_context {cfg.max_context}; fix: "
                    "stride <= max_context, or 0 = max_context // 2"))
    if cfg.whiten_kinds and not cfg.valid_corpus:
        out.append((("whiten", "valid_corpus"), "whiten needs valid_corpus (τ of a whitened index is chosen on it); "
                    'fix: valid_corpus = "data/corpora/wikitext2-valid.raw.gz" or whiten = "none"'))
    max_entries = cfg.datastore_limit_tokens - 1 if cfg.datastore_limit_tokens else None
    if max_entries is not None and cfg.k > max_entries:  # refused, not capped: a capped k is another experiment
        out.append((("k", "datastore_limit_tokens"), f"k = {cfg.k} exceeds the at most {max_entries:,} entries of a "
                    f"datastore limited to {cfg.datastore_limit_tokens:,} tokens; fix: k <= {max_entries:,}"))
    n_train = min(n for n in (cfg.train_size, max_entries) if n) if (cfg.train_size or max_entries) else None
    if n_train is not None and (problem := training_problem(cfg.index_factory, n_train)):
        out.append((("index_factory", "train_size", "datastore_limit_tokens"), problem))
    gib = cfg.search_batch * cfg.k * 12 / (1 << 30)
    if cfg.search_batch * cfg.k * 12 > SEARCH_RESULT_BYTES_MAX:
        out.append((("search_batch", "k"), f"search_batch x k = {cfg.search_batch:,} x {cfg.k:,} needs {gib:.1f} GiB "
                    f"of results per search call (limit 4 GiB); fix: search_batch <= "
                    f"{max(1, SEARCH_RESULT_BYTES_MAX // (12 * cfg.k)):,}"))
    return out


IMPORT_FORMATS = ("knn-transformers",)  # what import_datastore = "FORMAT:DIR" accepts


def import_problem(value: str) -> str | None:
    """One line saying why `import_datastore` cannot be used ("" is fine), else None.

    Checked by the run's preflight (it looks at the file system), not by `validate`."""
    if not value:
        return None
    fmt, sep, folder = value.partition(":")
    if not sep or fmt not in IMPORT_FORMATS:
        return (f"invalid config: import_datastore = {_show(value)} names no known format; fix: "
                '"knn-transformers:DIR", point it at the knn-transformers dstore_dir')
    if not folder.strip() or not resolve_path(folder).is_dir():
        return (f"invalid config: import_datastore = {_show(value)}: {_show(folder)} is no directory; fix: point it "
                "at the knn-transformers dstore_dir")
    return None


def check_import(cfg: RunConfig) -> None:
    """ConfigError (one line) when cfg.import_datastore is set but names no known format or no directory."""
    if problem := import_problem(cfg.import_datastore):
        raise ConfigError(problem)


def import_dir(value: str) -> Path:
    """The folder of `import_datastore = "knn-transformers:DIR"` (resolved like every config path)."""
    return resolve_path(value.partition(":")[2])


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


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML table of `path`; ConfigError (one line) if missing, unreadable, not UTF-8 or not TOML."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {path} (see configs/ for presets)")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err}); check its permissions") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start}); save it as UTF-8") from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config {path} is not valid TOML: {str(err).splitlines()[0]}") from err


def load_config(path: Path | None, overrides: dict[str, Any] | None = None,
                flags: dict[str, str] | None = None) -> RunConfig:
    """RunConfig from a TOML file plus non-None overrides, type-checked and validated.

    `flags` names the CLI flag of each override field (for error messages).
    """
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        data = _normalise(read_toml(path), str(path))
        origin = {k: str(path) for k in data}
    extra = _normalise({k: v for k, v in (overrides or {}).items() if v is not None}, "overrides")
    data.update(extra)
    origin.update({k: (flags or {}).get(k, "overrides") for k in extra})
    for name, value in data.items():  # before the dataclass is built: a wrong type never reaches a method
        check_type(name, value, FIELD_TYPES[name], origin.get(name))
        if FIELD_TYPES[name] is float:
            data[name] = float(value)  # an int where a float is expected: stored as the float it means
    return RunConfig(**data).validate(origin)


def resolve_path(value: str) -> Path:
    """A config path: absolute as is; relative to the repo root if it exists there, else to cwd."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p.resolve()
