"""Hostile command lines, run as real subprocesses (issue 18): each ends with exit code 2 and one
`error:` line on stderr, no traceback, and leaves the run directory it names exactly as it was.

Every entry point validates before it imports torch or faiss, so one case costs a fraction of a
second; the cases run four at a time. Cases against an existing run use a private copy of the
session's tiny run; cases against a new run directory assert it was never created.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN_CONFIG, write_toml
from test_app_garbled import garble_table, reads

from knnlm_core.config import FIELD_TYPES, RULES, RunConfig


@dataclass(frozen=True)
class Case:
    """One hostile command line: argv after `python`, and the directory that must not change."""

    name: str
    argv: tuple[str, ...]
    watch: Path | None  # a run directory whose files must be unchanged (or stay absent)
    code: int = 2


def tree_hash(folder: Path | None) -> str | None:
    """sha256 over every file's relative path and bytes under `folder`; None if it does not exist."""
    if folder is None or not os.path.lexists(folder):
        return None
    digest = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")) if folder.is_dir() else [folder]:
        digest.update(str(p.relative_to(folder) if folder.is_dir() else p.name).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def run_case(case: Case, env: dict[str, str]) -> tuple[Case, int, str, bool]:
    """(case, exit code, stderr, watched directory unchanged)."""
    before = tree_hash(case.watch)
    proc = subprocess.run([sys.executable, *case.argv], cwd=REPO, env=env, capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    return case, proc.returncode, err, tree_hash(case.watch) == before


def problems_of(results) -> list[str]:
    """One line per case that broke the contract (wrong code, not one error line, traceback, changes)."""
    bad = []
    for case, code, err, unchanged in results:
        lines = [line for line in err.splitlines() if line.strip()]
        why = []
        if code != case.code:
            why.append(f"exit {code}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            why.append(f"stderr {lines[-3:]!r}")
        if "Traceback" in err:
            why.append("traceback")
        if not unchanged:
            why.append("run directory changed")
        if why:
            bad.append(f"{case.name}: {', '.join(why)}")
    return bad


# ---------------------------------------------------------------- the table

def bad_values(name: str) -> list[str]:
    """TOML spellings of values that field `name` must refuse, from its type and its rule."""
    typ, rule = FIELD_TYPES[name], RULES[name]
    out = ["true", "[1, 2]", "{ a = 1 }"]
    if typ is int:
        out += ["1.5", '"7"']
        if rule.lo is not None:
            out.append(str(int(rule.lo) - 1 if not rule.zero_ok else -1))
        if rule.hi is not None:
            out.append(str(int(rule.hi) + 1))
    elif typ is float:
        out += ['"0.5"', "nan", "inf"]
        if rule.lo is not None:
            out.append(str(rule.lo if rule.lo_open else rule.lo - 1))
        if rule.hi is not None:
            out.append(str(rule.hi * 2 + 1))
    elif typ is str:
        out += ["123"]
        if rule.choices:
            out.append('"bogus"')
        if rule.nonempty:
            out.append('"  "')
    return out


def field_cases(tmp: Path, base: dict) -> list[Case]:
    """For every config field, two values it must refuse (a wrong type and its last, range or choice, value)
    in a TOML file run as a subprocess (the run dir must stay absent); test_every_bad_value_is_one_line
    checks every value of bad_values in process."""
    cases = []
    for name in FIELD_TYPES:
        key = "lambda" if name == "lam" else name
        values = bad_values(name)
        for i, value in enumerate([values[0], values[-1]]):
            cfg = tmp / f"field-{key}-{i}.toml"
            body = {k: v for k, v in base.items() if k != key}
            write_toml(cfg, body)
            cfg.write_text(cfg.read_text() + f"{key} = {value}\n")
            run_dir = tmp / f"never-{key}-{i}"
            cases.append(Case(f"{key} = {value}", ("-m", "precompute", "--config", str(cfg), "--run-dir",
                                                   str(run_dir)), run_dir))
    return cases


def files(tmp: Path, tiny_model: Path) -> dict[str, Path]:
    """Hostile files: broken configs, corpora and model directories."""
    f = {}
    f["not_utf8"] = tmp / "latin1.toml"
    f["not_utf8"].write_bytes('model = "caf\xe9"\n'.encode("latin-1"))
    f["bad_toml"] = tmp / "bad.toml"
    f["bad_toml"].write_text("k = = 3\n")
    f["unknown"] = tmp / "unknown.toml"
    f["unknown"].write_text("nprob = 8\n")
    f["binary"] = tmp / "binary.txt"
    f["binary"].write_bytes(bytes(range(256)) * 4)
    f["empty"] = tmp / "empty.txt"
    f["empty"].write_text("")
    f["bad_gz"] = tmp / "bad.txt.gz"
    f["bad_gz"].write_bytes(gzip.compress(b"hello world " * 100)[:40])
    f["a_file"] = tmp / "a-file"
    f["a_file"].write_text("x")
    truncated = tmp / "model-truncated"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    f["model_truncated"] = truncated
    garbage = tmp / "model-garbage"
    shutil.copytree(tiny_model, garbage)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    f["model_garbage"] = garbage
    nojson = tmp / "model-nojson"
    shutil.copytree(tiny_model, nojson)
    (nojson / "config.json").write_text("{ not json")
    f["model_nojson"] = nojson
    f["rates_bad"] = tmp / "rates.json"
    f["rates_bad"].write_text('{"gpu_flops": -1}')
    f["rates_unknown"] = tmp / "rates2.json"
    f["rates_unknown"].write_text('{"warp_speed": 9}')
    f["train_bad"] = tmp / "train.toml"
    f["train_bad"].write_text("n_layer = 0\n")
    f["train_type"] = tmp / "train2.toml"
    f["train_type"].write_text('lr = "fast"\n')
    f["train_heads"] = tmp / "train3.toml"
    f["train_heads"].write_text("n_embd = 100\nn_head = 7\n")
    return f


def cli_cases(tmp: Path, good_cfg: Path, run: Path, broken: Path, f: dict[str, Path],
              garbled: Path | None = None) -> list[Case]:
    """Hand-written hostile command lines over every entry point (`garbled`: a run whose metrics.duckdb has a
    damaged data block, see hostile_setup)."""
    new = tmp / "new-run"
    pre = ("-m", "precompute", "--config", str(good_cfg), "--run-dir")
    table: list[tuple[str, tuple[str, ...], Path | None]] = [
        # config overrides on the command line
        *[(f"{flag} {value}", (*pre, str(new), flag, value), new) for flag, value in [
            ("--k", "64.5"), ("--k", "abc"), ("--k", "-1"), ("--k", "0"), ("--k", "100000"), ("--k", "1e3"),
            ("--threads", "0"), ("--threads", "-2"), ("--eval-limit-tokens", "-1"), ("--eval-limit-tokens", "1"),
            ("--lambda", "1.5"), ("--lambda", "nan"), ("--lambda", "inf"), ("--lambda", "-0.1"),
            ("--temperature", "0"), ("--temperature", "-1"), ("--nprobe", "0"), ("--shard-size", "0"),
            ("--store-neighbors", "-1"), ("--index-factory", "IVF0,PQ8"), ("--index-factory", "HNSW32"),
            ("--index-factory", ""), ("--index-factory", "IVF8,PQ7"), ("--index-factory", "IVF99999999,PQ8"),
            ("--index-factory", "PQ0"), ("--index-factory", "IVF8,PQ8x99"), ("--index-factory", "IVF4096,PQ8"),
            ("--index-factory", "Bogus12"), ("--index-factory", "IVF8,,PQ8"), ("--device", "tpu"),
            ("--distance-source", "cosine"), ("--model", ""), ("--model", "/nonexistent/model-dir"),
            ("--model", str(f["a_file"])), ("--model", str(f["model_truncated"])),
            ("--model", str(f["model_garbage"])), ("--model", str(f["model_nojson"])),
            ("--eval-corpus", "/nonexistent/corpus.txt"), ("--eval-corpus", str(f["binary"])),
            ("--eval-corpus", str(f["empty"])), ("--eval-corpus", str(f["bad_gz"])), ("--eval-corpus", str(tmp)),
            ("--executor", "bogus"), ("--bogus-flag", "1"), ("--k", "99999999999999999999999"),
        ]],
        # the run directory
        ("--run-dir ''", (*pre, ""), None),
        ("--run-dir <file>", (*pre, str(f["a_file"])), f["a_file"]),
        ("--run-dir <file>/sub", (*pre, str(f["a_file"] / "sub")), f["a_file"]),
        ("--run-dir /proc", (*pre, "/proc/knnlm-run"), None),
        ("--run-dir /dev/null/x", (*pre, "/dev/null/run"), None),
        ("--run-dir too long", (*pre, str(tmp / ("x" * 300))), None),
        ("--run-dir NUL", (*pre, "a\x01b" + "y" * 260), None),
        ("no --run-dir", ("-m", "precompute", "--config", str(good_cfg)), None),
        ("no --config", ("-m", "precompute", "--run-dir", str(new)), new),
        ("no arguments", ("-m", "precompute"), None),
        # the config file
        ("config missing", ("-m", "precompute", "--config", str(tmp / "none.toml"), "--run-dir", str(new)), new),
        ("config is a dir", ("-m", "precompute", "--config", str(tmp), "--run-dir", str(new)), new),
        ("config not UTF-8", ("-m", "precompute", "--config", str(f["not_utf8"]), "--run-dir", str(new)), new),
        ("config not TOML", ("-m", "precompute", "--config", str(f["bad_toml"]), "--run-dir", str(new)), new),
        ("config unknown key", ("-m", "precompute", "--config", str(f["unknown"]), "--run-dir", str(new)), new),
        ("config ''", ("-m", "precompute", "--config", "", "--run-dir", str(new)), new),
        # against an existing good run: refused, and nothing in it changes
        ("other config, no --overwrite", (*pre, str(run), "--lambda", "0.5"), run),
        ("--overwrite, truncated model", (*pre, str(run), "--overwrite", "--model", str(f["model_truncated"])), run),
        ("--overwrite, garbage model", (*pre, str(run), "--overwrite", "--model", str(f["model_garbage"])), run),
        ("--overwrite, PQ7", (*pre, str(run), "--overwrite", "--index-factory", "IVF8,PQ7"), run),
        ("--overwrite, bad corpus", (*pre, str(run), "--overwrite", "--eval-corpus", str(f["binary"])), run),
        ("--overwrite, k > datastore", (*pre, str(run), "--overwrite", "--k", "100000"), run),
        ("--overwrite, IVF0", (*pre, str(run), "--overwrite", "--index-factory", "IVF0,PQ8"), run),
        # a garbled metrics.duckdb (a block checksum fails when eval_tokens is read): a rerun and verify refuse it
        *([("rerun, garbled metrics.duckdb", (*pre, str(garbled)), garbled),
           ("--overwrite, garbled, PQ7", (*pre, str(garbled), "--overwrite", "--index-factory", "IVF8,PQ7"), garbled),
           ("verify, garbled metrics.duckdb", ("-m", "precompute.verify", "--run-dir", str(garbled)), garbled)]
          if garbled else []),
        # precompute.verify
        *[(f"verify {' '.join(a)}", ("-m", "precompute.verify", *a), w) for a, w in [
            (("--run-dir", str(run), "--sample", "-5"), run), (("--run-dir", str(run), "--sample", "0"), run),
            (("--run-dir", str(run), "--sample", "abc"), run), (("--run-dir", str(run), "--type-sample", "-1"), run),
            (("--run-dir", str(run), "--exact-sample", "1.5"), run), (("--run-dir", str(tmp / "none")), None),
            (("--run-dir", ""), None), (("--run-dir", str(f["a_file"])), f["a_file"]), ((), None),
            (("--run-dir", str(run), "--bogus"), run), (("--run-dir", str(broken)), broken),
            (("--run-dir", str(tmp)), None),
        ]],
        # precompute.plan
        *[(f"plan {' '.join(a)}", ("-m", "precompute.plan", *a), None) for a in [
            ("--config", str(good_cfg), "--nodes", "-3"), ("--config", str(good_cfg), "--gpus", "-1"),
            ("--config", str(good_cfg), "--cpus", "0"), ("--config", str(good_cfg), "--entries", "-5"),
            ("--config", str(good_cfg), "--eval-positions", "x"), ("--config", str(tmp / "none.toml")),
            ("--config", str(f["not_utf8"])), ("--config", str(f["bad_toml"])), (),
            ("--config", str(good_cfg), "--rates", str(tmp / "none.json")),
            ("--config", str(good_cfg), "--rates", str(f["rates_bad"])),
            ("--config", str(good_cfg), "--rates", str(f["rates_unknown"])),
            ("--config", str(good_cfg), "--rates", str(f["bad_toml"])),
            ("--config", str(good_cfg), "--measured", str(tmp / "none")),
            ("--config", str(good_cfg), "--executor", "mpi"), ("--config", ""),
        ]],
        # precompute.train_lm
        *[(f"train_lm {' '.join(a)}", ("-m", "precompute.train_lm", *a), None) for a in [
            ("--config", str(f["train_bad"])), ("--config", str(f["train_type"])), ("--config", str(f["train_heads"])),
            ("--config", str(f["not_utf8"])), ("--config", str(f["unknown"])), ("--config", str(tmp / "none.toml")),
            (), ("--config", ""),
        ]],
        # bench scripts' arguments
        ("bench/index --n -5", ("bench/index.py", "--n", "-5"), None),
        ("bench/index --factory IVF0", ("bench/index.py", "--factory", "IVF0,PQ8"), None),
        ("bench/exact --k 0", ("bench/exact.py", "--k", "0"), None),
        ("bench/search --bogus", ("bench/search.py", "--bogus"), None),
        ("bench/torch_ivfpq --bogus", ("bench/torch_ivfpq.py", "--bogus"), None),
        ("bench/device_check --bogus", ("bench/device_check.py", "--bogus"), None),
        ("bench/plan_check --bogus", ("bench/plan_check.py", "--bogus"), None),
        ("bench/whatif --bogus", ("bench/whatif.py", "--bogus"), None),
        ("bench/preset no --run-dir", ("bench/preset.py",), None),
    ]
    return [Case(name, argv, watch) for name, argv, watch in table]


@pytest.fixture(scope="module")
def hostile_setup(tmp_path_factory, tiny_run, tiny_model):
    """(temp dir, good config, a private copy of a good run, a copy with a truncated metrics.duckdb, files,
    a copy whose metrics.duckdb has bytes overwritten inside a data block of eval_tokens)."""
    tmp = tmp_path_factory.mktemp("hostile")
    base = {"model": str(tiny_model), **TINY_RUN_CONFIG}
    good_cfg = write_toml(tmp / "good.toml", base)
    run = tmp / "good-run"
    shutil.copytree(tiny_run, run)
    # the copy must hold the good config (tiny_run was built from the same values)
    broken = tmp / "broken-run"
    shutil.copytree(tiny_run, broken)
    db = broken / "metrics.duckdb"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    garbled = tmp / "garbled-run"
    shutil.copytree(tiny_run, garbled)
    garble_table(garbled / "metrics.duckdb", "eval_tokens")
    assert not reads(garbled / "metrics.duckdb", "eval_tokens") and reads(garbled / "metrics.duckdb", "run")
    return tmp, base, good_cfg, run, broken, files(tmp, tiny_model), garbled


def test_hostile_command_lines(hostile_setup):
    tmp, base, good_cfg, run, broken, f, garbled = hostile_setup
    cases = cli_cases(tmp, good_cfg, run, broken, f, garbled) + field_cases(tmp, base)
    assert len(cases) >= 100
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KNNLM_LOG_DIR": str(tmp / "logs"), "PYTHONPATH": str(REPO)}
    # Cases that watch the same directory run one after another: an --overwrite case may leave
    # transient files in the run it is refused on, which a concurrent case's snapshot would see.
    groups: dict[object, list[Case]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(case.watch if case.watch is not None else i, []).append(case)
    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(lambda g: [run_case(c, env) for c in g], groups.values()) for r in rs]
    bad = problems_of(results)
    print(f"{len(cases)} hostile command lines, {len(bad)} broke the contract")
    assert not bad, "\n".join(bad)
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(("never-", "new-run", "x" * 10))]
    assert not leftovers, leftovers


def test_internal_error_is_one_line_with_a_log(tmp_path, monkeypatch, capsys):
    """An unexpected exception: exit 1, one `error:` line naming the log, the traceback in that log."""
    from precompute.cli import run_cli

    monkeypatch.setenv("KNNLM_LOG_DIR", str(tmp_path))

    def boom() -> int:
        raise ZeroDivisionError("division by zero\nsecond line")

    assert run_cli(boom, "test") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: internal error ZeroDivisionError")
    log = next(tmp_path.glob("test-*.log"))
    assert str(log) in err[0] and "Traceback" in log.read_text()


def test_every_field_has_a_hostile_value():
    """The generated table covers every RunConfig field (a new field without a rule fails here)."""
    assert set(RULES) == set(FIELD_TYPES) == {f for f in RunConfig.__dataclass_fields__}
    assert all(bad_values(name) for name in FIELD_TYPES)


def test_every_bad_value_is_one_line(tmp_path):
    """Every value bad_values lists, for every field, is refused by load_config with one line naming the field."""
    from knnlm_core.config import ConfigError, load_config

    base = {"model": "data/models/demo-gpt2", **TINY_RUN_CONFIG}
    n = 0
    for name in FIELD_TYPES:
        key = "lambda" if name == "lam" else name
        for value in bad_values(name):
            cfg = write_toml(tmp_path / "c.toml", {k: v for k, v in base.items() if k != key})
            cfg.write_text(cfg.read_text() + f"{key} = {value}\n")
            with pytest.raises(ConfigError) as err:
                load_config(cfg)
            message = str(err.value)
            assert "\n" not in message and key in message, (key, value, message)
            n += 1
    assert n >= 3 * len(FIELD_TYPES)


def test_overwrite_rebuilds_a_garbled_database_safely(hostile_setup, tiny_run, tmp_path, capsys):
    """A rerun with --overwrite on a garbled metrics.duckdb: the garbled file is kept aside byte for byte, the
    database stage rebuilds the database (temp file + rename) from the kept stage outputs, and its tables equal
    the intact run's (read with plain DuckDB + pandas)."""
    import duckdb
    import pandas as pd

    from knnlm_core import store
    from precompute.__main__ import main

    good_cfg, garbled = hostile_setup[2], hostile_setup[6]
    run = tmp_path / "run"
    shutil.copytree(garbled, run)
    before = (run / "metrics.duckdb").read_bytes()
    assert main(["--config", str(good_cfg), "--run-dir", str(run)]) == 2  # refused, untouched
    assert (run / "metrics.duckdb").read_bytes() == before
    assert main(["--config", str(good_cfg), "--run-dir", str(run), "--overwrite"]) == 0
    assert "is garbled: kept as metrics.duckdb.garbled" in capsys.readouterr().err
    assert (run / "metrics.duckdb.garbled").read_bytes() == before and not (run / "metrics.duckdb.tmp").exists()
    store.check_file(run / "metrics.duckdb")

    def table(db: Path, name: str) -> pd.DataFrame:
        con = duckdb.connect(str(db), read_only=True)
        try:
            return con.execute(f"SELECT * FROM {name} ORDER BY ALL").df()
        finally:
            con.close()

    for name in ("eval_tokens", "neighbors", "token_types"):
        pd.testing.assert_frame_equal(table(run / "metrics.duckdb", name), table(tiny_run / "metrics.duckdb", name))
