"""Shared fixtures: tiny random models and real runs built by the real pipeline.

Runs are built once per test session from the shipped WikiText-2 slices with a tiny
GPT-2 (random weights, real GPT-2 tokenizer), a real IVFPQ index and a real DuckDB file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "data" / "models" / "demo-gpt2"  # the GPT-2 BPE files ship with the demo LM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAGE_TITLES = {  # page -> its st.title (AppTest and browser tests check that a page was drawn)
    "overview": "kNN-LM long-tail diagnostics",
    "bins": "Frequency bins",
    "novelty": "Context novelty",
    "tokens": "Token explorer",
    "neighbors": "Neighbour inspector",
    "exact": "Exact vs PQ search",
    "whatif": "What-if re-scoring",
    "mitigations": "Mitigations",
    "compare": "Compare runs",
    "probe": "Probe",
}

TINY_RUN_CONFIG = {
    "datastore_corpus": str(REPO / "data/corpora/wikitext2-valid.raw.gz"),
    "datastore_limit_tokens": 6000,
    "eval_corpus": str(REPO / "data/corpora/wikitext2-test.raw.gz"),
    "eval_limit_tokens": 500,
    "index_factory": "IVF8,PQ8x4",
    "train_size": 0,
    "nprobe": 4,
    "k": 64,
    "store_neighbors": 16,
    "batch_size": 8,
    "threads": 2,
    "shard_size": 2048,  # several shards per heavy stage even on a tiny run
}


def make_tiny_model(path: Path, family: str = "gpt2", seed: int = 0, hidden: int = 64) -> Path:
    """Save a tiny randomly initialised causal LM of `family` (+ the GPT-2 tokenizer) to `path`."""
    import torch
    import transformers

    from knnlm_core.corpus import load_tokenizer

    torch.manual_seed(seed)
    tok = load_tokenizer(str(TOKENIZER_DIR))
    vocab = len(tok)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=hidden, n_layer=2, n_head=2)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=4 * hidden,
                                         max_position_embeddings=128)
        model = transformers.GPTNeoXForCausalLM(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2,
                                       intermediate_size=2 * hidden, max_position_embeddings=128)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = transformers.MistralConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         intermediate_size=2 * hidden, max_position_embeddings=128)
        model = transformers.MistralForCausalLM(cfg)
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_toml(path: Path, values: dict) -> Path:
    """Write a flat TOML file (strings, numbers, booleans)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        else:
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def build_tiny_run(run_dir: Path, model_dir: Path, **overrides) -> Path:
    """Build a real run with the pipeline (in-process) from TINY_RUN_CONFIG + overrides."""
    from knnlm_core.config import load_config
    from precompute.pipeline import build_run

    cfg_path = write_toml(run_dir.parent / f"{run_dir.name}.toml", {"model": str(model_dir), **TINY_RUN_CONFIG})
    cfg = load_config(cfg_path, overrides)
    return build_run(cfg, run_dir)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory, tiny_model) -> Path:
    """A runs directory with two real runs: `tiny` (PQ distances) and `tiny-exact` (exact distances)."""
    root = tmp_path_factory.mktemp("runs")
    build_tiny_run(root / "tiny", tiny_model)
    build_tiny_run(root / "tiny-exact", tiny_model, distance_source="exact")
    return root


MITIGATIONS = {"valid_corpus": str(REPO / "data/corpora/wikitext2-train.tokens.gz"), "valid_limit_tokens": 500,
               "whiten": "zipfian,entries"}


@pytest.fixture(scope="session")
def mitigated_run(tmp_path_factory, tiny_model) -> Path:
    """A tiny run with the SPEC §9 mitigations (validation pass, IDF, adaptive λ, two whitened indexes),
    in a runs directory of its own (the AppTest pages that list runs keep seeing `runs_root` alone)."""
    root = tmp_path_factory.mktemp("mitigated")
    return build_tiny_run(root / "tiny-mitigated", tiny_model, **MITIGATIONS)


@pytest.fixture(scope="session")
def tiny_run(runs_root) -> Path:
    """Path of a complete real run directory (manifest.json, metrics.duckdb, keys/, ...)."""
    return runs_root / "tiny"


@pytest.fixture
def fresh_run(tmp_path, tiny_run) -> Path:
    """A private copy of the tiny run that a test may modify."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def app_on(root: Path, monkeypatch):
    """Point the app at the runs in `root`, with empty streamlit caches before and after (AppTest tests)."""
    import streamlit as st

    monkeypatch.setenv("KNNLM_RUNS_DIR", str(root))
    st.cache_data.clear()
    st.cache_resource.clear()
    yield root
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture(scope="session", autouse=True)
def scan_streamlit_components_once():
    """Scan the installed packages for Streamlit v2 components once per test process, not once per AppTest.

    Every new AppTest parses the metadata of every installed distribution (~150 here, 16 threads) for component
    manifests. Measured on the loaded 2-core machine, test_url_fuzz's fresh sessions one after another: 20 took
    33 s wall with a scan each, 9 s with one scan; 30 took 6.4 s CPU against 2.2 s (test_url_fuzz opens ~170).
    The packages do not change during a test run (this environment has no v2 component: the scan finds none),
    so the same result is handed back; each AppTest still registers it in its own component manager.
    """
    try:
        from streamlit.components.v2 import manifest_scanner

        scan = manifest_scanner.scan_component_manifests
    except (ImportError, AttributeError):  # another Streamlit: nothing to share, every AppTest scans
        yield
        return
    found: dict[object, list] = {}

    def scan_once(max_workers: int | None = None) -> list:
        if max_workers not in found:
            found[max_workers] = scan(max_workers)
        return list(found[max_workers])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifest_scanner, "scan_component_manifests", scan_once)
        yield


@pytest.fixture
def runs_env(runs_root, monkeypatch):
    """The app on the session's test runs."""
    yield from app_on(runs_root, monkeypatch)


# The longest test files first: xdist (`--dist loadfile`, pyproject.toml) hands files to its two workers in
# collection order, so the long ones start at once and the short ones fill in at the end (measured: the tail
# with the long files last left one worker idle for over a minute).
LONGEST_FIRST = ("test_ray.py", "test_runner.py", "test_e2e_browser.py", "test_page_params.py", "test_verify.py",
                 "test_mitigate_stage.py", "test_url_fuzz.py", "test_plan.py", "test_pipeline.py", "test_hostile_cli.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


# ---------------------------------------------------------------- read-side fixtures (tests/test_read_*.py)


@pytest.fixture(scope="module")
def cur(tiny_run):
    """A read-only cursor on the session's tiny run."""
    from knnlm_core import store

    con = store.open_readonly(tiny_run / store.DB_NAME)
    yield con.cursor()
    con.close()


@pytest.fixture(scope="module")
def ev(cur):
    """The tiny run's eval_tokens, ordered by position (the pandas reference of the read-side tests)."""
    return cur.execute("SELECT * FROM eval_tokens ORDER BY pos").df()


@pytest.fixture(scope="module")
def demo():
    """A read-only cursor on the shipped demo run (skipped when it is absent)."""
    from knnlm_core import store

    path = REPO / "data" / "runs" / "demo" / store.DB_NAME
    if not path.exists():
        pytest.skip("shipped demo run not present")
    con = store.open_readonly(path)
    yield con.cursor()
    con.close()
