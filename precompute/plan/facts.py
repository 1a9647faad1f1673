"""The sizes a plan is computed from: entries, positions, types, the model's shape, the windows.

`run_facts` counts them from the config (tokenizing the corpora when they and the tokenizer
are here, else from KNOWN_TOKENS); `plan_facts` builds them from counts a running pipeline
already has, without tokenizing anything (it must cost well under a second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from knnlm_core.config import ConfigError, RunConfig, resolve_path

# Corpus sizes in GPT-2 tokens for files that may not be on this machine (the paper's datastore).
KNOWN_TOKENS = {"wiki.train.tokens": 117_000_000, "wikitext2-train.tokens.gz": 2_448_382,
                "wikitext2-test.raw.gz": 286_221, "wikitext2-valid.raw.gz": 249_887,
                "wiki.test.raw": 286_221, "wiki.valid.raw": 249_887}
GATED = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo", "olmo2")
TYPES_PER_GROUP = 4096  # precompute.stages.types.TYPES_PER_SHARD: contamination groups hold this many types


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
class Facts:
    """Sizes of one run: entries, evaluation positions, types seen, model shape, windows."""

    n: int  # datastore entries
    t: int  # evaluation positions
    types: int  # distinct datastore values (types with freq >= 1)
    groups: int  # contamination groups (types bucketed by m_v, TYPES_PER_GROUP per group)
    tokens_ds: int  # tokens run through the model for the datastore (windows overlap)
    tokens_ev: int
    sq_ds: int  # sum of window length² (attention cost)
    sq_ev: int
    shape: ModelShape
    source: str  # where the counts come from: "tokenized", "known sizes" or "counted by the run"
    t_valid: int = 0  # validation positions (SPEC §9 mitigations; 0 = none)
    tokens_va: int = 0
    sq_va: int = 0


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


def windows_of(cfg: RunConfig, shape: ModelShape) -> tuple[int, int]:
    """(max_context, stride) as precompute.pipeline.resolve_windows chooses them."""
    ctx = cfg.max_context or min(shape.positions, 1024)
    return ctx, cfg.stride or max(1, ctx // 2)


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


def known_size(rel: str, limit: int) -> int:
    name = Path(rel).name
    if name not in KNOWN_TOKENS:
        raise ConfigError(f"corpus {rel} is not on this machine and its size is unknown: pass --entries / "
                          "--eval-positions")
    return min(KNOWN_TOKENS[name], limit) if limit else KNOWN_TOKENS[name]


def heaps_types(n: int, vocab: int) -> tuple[int, int]:
    """(types, contamination groups) of an n-entry datastore not tokenized here: Heaps' law through
    WikiText-2's 27,102 types in 2.45M tokens, capped by the vocabulary."""
    types = min(vocab, int(27_102 * (n / 2.45e6) ** 0.45))
    return types, 11 + math.ceil(types / TYPES_PER_GROUP)  # m_v buckets 1, 2, ..., 1024 + full groups


def valid_positions(cfg: RunConfig, t_eval: int) -> int:
    """Validation positions without tokenizing: the known size of the file, else the evaluation size."""
    if not cfg.valid_corpus:
        return 0
    if Path(cfg.valid_corpus).name in KNOWN_TOKENS:
        return known_size(cfg.valid_corpus, cfg.valid_limit_tokens) - 1
    return min(t_eval, cfg.valid_limit_tokens - 1) if cfg.valid_limit_tokens else t_eval


def assemble(cfg: RunConfig, shape: ModelShape, n: int, t: int, t_valid: int, types: int, groups: int,
             source: str) -> Facts:
    """Facts from the counts: the windows' work follows from the config's window settings."""
    ctx, stride = windows_of(cfg, shape)
    tok_ds, sq_ds = window_work(n + 1, ctx, stride)
    tok_ev, sq_ev = window_work(t + 1, ctx, stride)
    tok_va, sq_va = window_work(t_valid + 1, ctx, stride) if t_valid else (0, 0)
    return Facts(n, t, types, groups, tok_ds, tok_ev, sq_ds, sq_ev, shape, source, t_valid, tok_va, sq_va)


def run_facts(cfg: RunConfig, entries: int = 0, eval_positions: int = 0) -> Facts:
    """Sizes of the run `cfg` describes: tokenized here when the corpora are, else KNOWN_TOKENS."""
    import numpy as np

    from precompute.stages.types import contamination_groups

    shape = model_shape(cfg)
    ds = None if entries else corpus_ids(cfg, cfg.datastore_corpus, cfg.datastore_limit_tokens)
    ev = None if eval_positions else corpus_ids(cfg, cfg.eval_corpus, cfg.eval_limit_tokens)
    if ds is not None:
        n = len(ds) - 1
        freq = np.bincount(ds[1:], minlength=shape.vocab)
        types, groups = int((freq > 0).sum()), len(contamination_groups(freq))
    else:
        n = entries or known_size(cfg.datastore_corpus, cfg.datastore_limit_tokens) - 1
        types, groups = heaps_types(n, shape.vocab)
    t = len(ev) - 1 if ev is not None else eval_positions or known_size(cfg.eval_corpus, cfg.eval_limit_tokens) - 1
    t_valid = 0
    if cfg.valid_corpus:
        va = corpus_ids(cfg, cfg.valid_corpus, cfg.valid_limit_tokens)
        t_valid = len(va) - 1 if va is not None else valid_positions(cfg, t)
    return assemble(cfg, shape, n, t, t_valid, types, groups, "tokenized" if ds is not None else "known sizes")


def plan_facts(cfg: RunConfig, n_entries: int, n_eval: int) -> Facts | None:
    """Facts of a run whose pipeline has counted its entries and evaluation positions (nothing tokenized:
    types by Heaps' law, validation positions by known size); None when even that fails (the model's
    shape unreadable): a plan must never stop a run."""
    try:
        shape = model_shape(cfg)
        types, groups = heaps_types(n_entries, shape.vocab)
        return assemble(cfg, shape, n_entries, n_eval, valid_positions(cfg, n_eval), types, groups,
                        "counted by the run")
    except Exception:  # noqa: BLE001 - the plan is advice; the run goes on without it
        return None
