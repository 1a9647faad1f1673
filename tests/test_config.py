"""Tests of knnlm_core.config: TOML + overrides -> one frozen, validated RunConfig (SPEC §2 defaults)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from knnlm_core.config import REPO_ROOT, ConfigError, RunConfig, check_import, load_config, resolve_path


def toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_papers():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert (cfg.index_factory, cfg.nprobe, cfg.k, cfg.temperature, cfg.lam, cfg.distance_source) == (
        "IVF4096,PQ64", 32, 1024, 10.0, 0.25, "pq")
    assert cfg.contamination_search == "exact"


def test_load_from_toml_with_lambda(tmp_path):
    path = toml(tmp_path / "run.toml", 'model = "gpt2-xl"\nk = 64\nlambda = 0.4\ntemperature = 5.0\n')
    cfg = load_config(path)
    assert cfg.model == "gpt2-xl" and cfg.k == 64 and cfg.lam == 0.4 and cfg.temperature == 5.0
    assert cfg.nprobe == 32  # untouched default


def test_overrides_win_and_none_is_ignored(tmp_path):
    path = toml(tmp_path / "run.toml", "k = 64\nlambda = 0.4\n")
    cfg = load_config(path, {"k": 16, "lambda": 0.1, "nprobe": None, "temperature": None})
    assert cfg.k == 16 and cfg.lam == 0.1
    assert cfg.nprobe == 32 and cfg.temperature == 10.0
    assert load_config(None, {"lam": 0.3}).lam == 0.3  # the field name works too


def test_to_dict_uses_toml_spelling_and_round_trips(tmp_path):
    cfg = load_config(None, {"lambda": 0.6, "k": 8, "model": "gpt2"})
    data = cfg.to_dict()
    assert "lambda" in data and "lam" not in data and data["lambda"] == 0.6
    # an empty import_datastore is left out: native runs' records and stage keys are those from before the field
    assert set(data) == {f.name for f in dataclasses.fields(RunConfig)} - {"lam", "import_datastore"} | {"lambda"}
    lines = [f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {v}" for k, v in data.items()]
    assert load_config(toml(tmp_path / "dump.toml", "\n".join(lines) + "\n")) == cfg
    imported = load_config(None, {"import_datastore": f"knn-transformers:{tmp_path}"})
    assert imported.to_dict()["import_datastore"] == f"knn-transformers:{tmp_path}"
    assert load_config(None, imported.to_dict()) == imported


@pytest.mark.parametrize("value, match", [
    ("{tmp}", "names no known format"), ("faiss:{tmp}", "names no known format"),
    ("knn-transformers:{tmp}/nope", "is no directory; fix: point it at the knn-transformers dstore_dir"),
    ("knn-transformers:", "is no directory")])
def test_import_datastore_is_checked_in_one_line(tmp_path, value, match):
    """The form and the folder are checked by the run's preflight (check_import), not by validate."""
    cfg = load_config(None, {"import_datastore": value.format(tmp=tmp_path)})
    with pytest.raises(ConfigError, match=match) as err:
        check_import(cfg)
    assert "\n" not in str(err.value) and "import_datastore" in str(err.value)
    check_import(load_config(None, {"import_datastore": f"knn-transformers:{tmp_path}"}))  # a folder: accepted


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3  # type: ignore[misc]


def test_unknown_keys_error(tmp_path):
    with pytest.raises(ConfigError, match="nprob") as err:
        load_config(toml(tmp_path / "bad.toml", "nprob = 8\n"))
    assert "bad.toml" in str(err.value)
    with pytest.raises(ConfigError, match="overrides.*topk"):
        load_config(None, {"topk": 3})


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(toml(tmp_path / "broken.toml", "k = = 3\n"))
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lambda": 1.5}, "lambda"),
        ({"lambda": -0.1}, "lambda"),
        ({"temperature": 0.0}, "temperature"),
        ({"k": 0}, "k = 0"),
        ({"nprobe": 0}, "nprobe"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"distance_source": "cosine"}, "distance_source"),
        ({"contamination_search": "approx"}, "contamination_search"),
        ({"store_neighbors": -1}, "store_neighbors"),
        ({"batch_size": 0}, "batch_size"),
        ({"search_batch": 0}, "search_batch"),
        ({"max_context": 1}, "max_context"),
        ({"stride": -1}, "stride"),
        ({"model": ""}, "model"),
    ],
)
def test_validation_errors(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, overrides)


def test_validation_errors_from_toml(tmp_path):
    with pytest.raises(ConfigError, match="lambda"):
        load_config(toml(tmp_path / "lam.toml", "lambda = 2.0\n"))


@pytest.mark.parametrize("value", [0.0, 0.25, 1.0])
def test_lambda_bounds_inclusive(value):
    assert load_config(None, {"lambda": value}).lam == value


def test_store_neighbors_effective():
    assert load_config(None, {"k": 16, "store_neighbors": 64}).store_neighbors_effective == 16
    assert load_config(None, {"k": 1024, "store_neighbors": 64}).store_neighbors_effective == 64


def test_max_context_zero_means_auto():
    cfg = load_config(None, {"max_context": 0, "stride": 0})
    assert cfg.max_context == 0 and cfg.stride == 0
    assert load_config(None, {"max_context": 2}).max_context == 2


def test_shipped_presets_load():
    for path in sorted((REPO_ROOT / "configs").glob("*.toml")):
        text = path.read_text()
        if "train_corpus" in text:  # LM-training presets are read by precompute.train_lm, not RunConfig
            continue
        assert isinstance(load_config(path), RunConfig)


def test_resolve_path(tmp_path, monkeypatch):
    assert resolve_path(str(tmp_path / "x.txt")) == tmp_path / "x.txt"
    assert resolve_path("data/corpora/wikitext2-test.raw.gz") == REPO_ROOT / "data/corpora/wikitext2-test.raw.gz"
    monkeypatch.chdir(tmp_path)
    assert resolve_path("not/here.txt") == (tmp_path / "not/here.txt").resolve()
