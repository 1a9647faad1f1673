"""Tests of precompute/verify/: each kind of corruption of metrics.duckdb is caught by name.

Every test corrupts a private copy of the tiny run (`fresh_run`) with one SQL statement and
checks that the specific verify check fails, while the same check passes on the intact run.
Key files are corrupted too: open_keys must fail with a clear KeyStoreError in either layout;
a database damaged on disk (a block failing its checksum) is bad input: one line, exit 2.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import build_tiny_run

from knnlm_core import store
from knnlm_core.keystore import KeyStoreError, open_keys
from precompute import verify
from precompute.verify import main as verify_main
from precompute.verify import verify_run

BRUTE = "token_types.contamination (brute force)"


def failed_names(run_dir: Path, **kwargs) -> set[str]:
    return {name for name, ok, _ in verify_run(run_dir, **kwargs) if not ok}


# For the tests of checks other than the token types': the key-space metrics of the sampled types (an sa_encode
# and sa_decode per type, about half of a verify of the tiny run) are recomputed for a few types only. What those
# tests assert (a named non-type check fails; no other hit_ check does) does not depend on the type sample.
FEW_TYPES = {"type_sample": 20}


def sql(run_dir: Path, statement: str, **frames: pd.DataFrame) -> None:
    """Run one statement on the run's metrics.duckdb, read-write (frames registered by name)."""
    con = duckdb.connect(str(run_dir / "metrics.duckdb"))
    for name, frame in frames.items():
        con.register(name, frame)
    con.execute(statement)
    con.close()


@pytest.fixture(scope="module")
def intact_checks(tiny_run) -> dict[str, bool]:
    return {name: ok for name, ok, _ in verify_run(tiny_run)}


def test_intact_run_passes_every_check(intact_checks):
    assert all(intact_checks.values()), [name for name, ok in intact_checks.items() if not ok]
    assert BRUTE in intact_checks  # the tiny run is built with contamination_mode = 'exact'


# ---------------------------------------------------------------- eval_tokens corruptions

def test_changed_p_knn_is_caught(fresh_run, intact_checks):
    sql(fresh_run, "UPDATE eval_tokens SET p_knn = p_knn * 0.5 + 1e-3 WHERE pos % 10 = 3")
    failed = failed_names(fresh_run, **FEW_TYPES)
    for name in ("p_knn (re-searched)", "p_knnlm = λ p_knn + (1-λ) p_lm"):
        assert intact_checks[name] and name in failed


def test_changed_p_knn_is_caught_outside_the_sample(fresh_run):
    """A position the re-search does not sample still fails the all-position p_kNNLM identity."""
    sql(fresh_run, "UPDATE eval_tokens SET p_knn = p_knn * 0.5 + 1e-3")
    assert "p_knnlm = λ p_knn + (1-λ) p_lm" in failed_names(fresh_run, sample=5, **FEW_TYPES)


def test_target_rank_zero_instead_of_null_is_caught(fresh_run, intact_checks):
    con = duckdb.connect(str(fresh_run / "metrics.duckdb"), read_only=True)
    n_null = con.execute("SELECT count(*) FROM eval_tokens WHERE target_rank IS NULL").fetchone()[0]
    con.close()
    assert n_null > 0  # the tiny run has positions with no target neighbour
    sql(fresh_run, "UPDATE eval_tokens SET target_rank = 0 WHERE target_rank IS NULL")
    failed = failed_names(fresh_run, **FEW_TYPES)
    for name in ("target_rank (re-searched)", "target_rank NULL iff n_target = 0, else in 1..k (all positions)"):
        assert intact_checks[name] and name in failed


@pytest.mark.parametrize("hk", [1, 8, 16, 64])
def test_flipped_hit_column_is_caught(fresh_run, intact_checks, hk):
    sql(fresh_run, f"UPDATE eval_tokens SET hit_{hk} = NOT hit_{hk} WHERE pos % 7 = 2")
    failed = failed_names(fresh_run, **FEW_TYPES)
    for name in (f"hit_{hk} (re-searched)", f"hit_{hk} = target_rank <= {hk} (all positions)"):
        assert intact_checks[name] and name in failed
    others = {name for name in failed if name.startswith("hit_") and not name.startswith(f"hit_{hk} ")}
    assert not others  # the failure names the flipped column only


# ---------------------------------------------------------------- token_types corruptions

def test_wrong_token_type_freq_bin_is_caught(fresh_run, intact_checks):
    sql(fresh_run, "UPDATE token_types SET freq_bin = freq_bin + 1 WHERE token_id % 11 = 0 AND freq >= 1")
    failed = failed_names(fresh_run)
    assert intact_checks["token_types.freq_bin"] and "token_types.freq_bin" in failed


def contamination_with_m(run_dir: Path, shift: int) -> pd.DataFrame:
    """Contamination of every datastore type with m = min(freq, 1024) + shift neighbours (numpy brute force).

    Only types with freq < 1024 and m + shift >= 1 get a row (the others keep their stored value).
    """
    keys = np.asarray(open_keys(run_dir), dtype=np.float32)  # (N, d)
    values = np.load(run_dir / "values.npy")
    types, freq = np.unique(values, return_counts=True)
    keep = (freq < 1024) & (freq + shift >= 1)
    types, freq = types[keep], freq[keep]
    mus = np.stack([keys[values == v].astype(np.float64).mean(axis=0) for v in types]).astype(np.float32)
    keys64, mus64 = keys.astype(np.float64), mus.astype(np.float64)
    # (J, N) in chunks of types: the same float64 difference sums, without a (J, N, d) temporary
    d2 = np.concatenate([((mus64[a : a + 32, None, :] - keys64[None, :, :]) ** 2).sum(-1)
                         for a in range(0, len(mus64), 32)])
    nearest = np.argsort(d2, axis=1, kind="stable")
    cont = [np.mean(values[nearest[j, : f + shift]] != v) for j, (v, f) in enumerate(zip(types, freq))]
    return pd.DataFrame({"token_id": types.astype(np.int32), "c": np.array(cont)})


@pytest.mark.parametrize("shift", [1, -1], ids=["m_plus_1", "m_minus_1"])
def test_contamination_off_by_one_is_caught(fresh_run, intact_checks, shift):
    wrong = contamination_with_m(fresh_run, shift)
    sql(fresh_run, "UPDATE token_types SET contamination = wrong.c FROM wrong WHERE token_types.token_id = "
                   "wrong.token_id", wrong=wrong)
    assert intact_checks[BRUTE]
    for seed in (0, 1, 2):  # whichever ~300 types are sampled (few positions: only the type check matters here)
        assert BRUTE in failed_names(fresh_run, seed=seed, sample=50, exact_sample=5)


def test_contamination_off_by_one_on_rarest_types_is_caught_with_a_small_sample(fresh_run):
    """The smallest-freq types are always checked, whatever the random sample."""
    wrong = contamination_with_m(fresh_run, 1)
    wrong = wrong[np.isin(wrong["token_id"], np.flatnonzero(np.bincount(np.load(fresh_run / "values.npy")) == 1))]
    assert len(wrong) > 0
    sql(fresh_run, "UPDATE token_types SET contamination = wrong.c FROM wrong WHERE token_types.token_id = "
                   "wrong.token_id", wrong=wrong)
    for seed in (0, 1, 2):
        assert BRUTE in failed_names(fresh_run, type_sample=4, seed=seed, sample=50, exact_sample=5)


def test_contamination_mode_must_be_recorded(fresh_run, intact_checks):
    sql(fresh_run, "UPDATE run SET contamination_mode = NULL")
    checks = {name: ok for name, ok, _ in verify_run(fresh_run)}
    assert intact_checks["run.contamination_mode is 'exact' or 'index'"]
    assert not checks["run.contamination_mode is 'exact' or 'index'"]
    assert not checks["run.contamination_mode = manifest contamination_search"]
    assert BRUTE not in checks  # no recorded mode: nothing says the brute force applies


def test_index_contamination_run_is_checked_against_the_index(tmp_path, tiny_model):
    run = build_tiny_run(tmp_path / "index-cont", tiny_model, contamination_search="index",
                         datastore_limit_tokens=3000, eval_limit_tokens=200)
    checks = {name: ok for name, ok, _ in verify_run(run)}
    assert all(checks.values()), [name for name, ok in checks.items() if not ok]
    assert "token_types.contamination (index re-search)" in checks and BRUTE not in checks


# ---------------------------------------------------------------- key files

def to_shards(run_dir: Path, rows_per_shard: int = 1500) -> list[Path]:
    """Rewrite the run's keys (either layout) as keys/ shards + keys/shards.json (SPEC §7), no keys.npy."""
    keys = np.array(open_keys(run_dir))  # (N, d) float16, in memory
    remove_shards(run_dir)
    (run_dir / "keys").mkdir()
    listing, paths = [], []
    for i, lo in enumerate(range(0, len(keys), rows_per_shard)):
        path = run_dir / "keys" / f"shard_{i:05d}.npy"
        np.save(path, keys[lo : lo + rows_per_shard])
        listing.append({"file": path.name, "rows": len(keys[lo : lo + rows_per_shard])})
        paths.append(path)
    (run_dir / "keys" / "shards.json").write_text(json.dumps({"n": len(keys), "d": keys.shape[1], "shards": listing}))
    if (run_dir / "keys.npy").exists():
        (run_dir / "keys.npy").unlink()
    return paths


def to_single_file(run_dir: Path) -> None:
    """Rewrite the run's keys (either layout) as one keys.npy, no keys/."""
    keys = np.array(open_keys(run_dir))  # (N, d) float16, in memory
    remove_shards(run_dir)
    np.save(run_dir / "keys.npy", keys)


def remove_shards(run_dir: Path) -> None:
    if (run_dir / "keys").exists():
        shutil.rmtree(run_dir / "keys")


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("layout", ["keys.npy", "shards"])
def test_verify_reads_either_key_layout(fresh_run, layout):
    before = np.array(open_keys(fresh_run))
    if layout == "keys.npy":
        to_single_file(fresh_run)
        assert not (fresh_run / "keys").exists()
    else:
        assert len(to_shards(fresh_run)) > 1
        assert not (fresh_run / "keys.npy").exists()
    np.testing.assert_array_equal(np.asarray(open_keys(fresh_run)), before)
    assert not failed_names(fresh_run, sample=200)
    assert verify_main(["--run-dir", str(fresh_run), "--sample", "100"]) == 0


def test_truncated_keys_npy_is_a_clear_error(fresh_run, capsys):
    to_single_file(fresh_run)
    truncate(fresh_run / "keys.npy")
    with pytest.raises(KeyStoreError, match="truncated or corrupt"):
        open_keys(fresh_run)
    with pytest.raises(KeyStoreError):
        verify_run(fresh_run)
    assert verify_main(["--run-dir", str(fresh_run)]) == 2
    assert "keys.npy" in capsys.readouterr().err


def test_truncated_key_shard_is_a_clear_error(fresh_run, capsys):
    if not (fresh_run / "keys" / "shards.json").exists():
        to_shards(fresh_run)
    shard = fresh_run / "keys" / json.loads((fresh_run / "keys" / "shards.json").read_text())["shards"][-1]["file"]
    truncate(shard)
    with pytest.raises(KeyStoreError, match=shard.name):
        open_keys(fresh_run)
    assert verify_main(["--run-dir", str(fresh_run)]) == 2
    assert shard.name in capsys.readouterr().err


def test_missing_keys_in_both_layouts_is_reported(fresh_run, capsys):
    if (fresh_run / "keys.npy").exists():
        (fresh_run / "keys.npy").unlink()
    remove_shards(fresh_run)
    assert verify_main(["--run-dir", str(fresh_run)]) == 2
    assert "keys.npy or keys/shards.json" in capsys.readouterr().err


# ---------------------------------------------------------------- exact search and words (SPEC §8, §10)

def test_exact_and_word_checks_run_on_the_intact_run(intact_checks):
    for name in ("p_knn_exact (brute force)", "exact_target_rank (brute force)", "p_knn_ivf_pq = p_knn (all positions)",
                 "exact_neighbors are the s nearest (brute force)", "recall_16 (brute force vs re-searched index)",
                 "eval_words.nll_lm = sum of token nll_lm", "recall_1024 is NULL (k=64)",
                 "eval_tokens.doc_id (evaluation text re-scanned)", "doc_bin_stats.sum_nll_knnlm"):
        assert intact_checks[name], name


@pytest.mark.parametrize("statement, names", [
    ("UPDATE eval_tokens SET p_knn_exact = p_knn_exact * 0.5 + 1e-3", ["p_knn_exact (brute force)"]),
    ("UPDATE eval_tokens SET p_knn_ivf_pq = p_knn_ivf_pq * 0.999 WHERE pos % 5 = 1",
     ["p_knn_ivf_pq = p_knn (all positions)"]),
    ("UPDATE eval_tokens SET exact_target_rank = coalesce(exact_target_rank, 0) + 1",
     ["exact_target_rank (brute force)"]),
    ("UPDATE eval_tokens SET recall_16 = 1.0", ["recall_16 (brute force vs re-searched index)"]),
    ("UPDATE exact_neighbors SET entry = entry + 1 WHERE rank = 3", ["exact_neighbors are the s nearest (brute force)"]),
    ("UPDATE eval_words SET nll_lm = nll_lm + 0.01 WHERE word_idx % 9 = 4", ["eval_words.nll_lm = sum of token nll_lm"]),
    ("UPDATE eval_words SET freq_bin = freq_bin + 1 WHERE word_idx = 0", ["eval_words.freq_bin"]),
    ("UPDATE eval_tokens SET doc_id = doc_id + 1 WHERE pos >= 250", ["eval_tokens.doc_id (evaluation text re-scanned)"]),
    ("UPDATE eval_tokens SET ctx_match_len = ctx_match_len + 1 WHERE pos % 7 = 2",
     ["ctx_match_len (scan of the datastore stream)"]),
    ("UPDATE eval_tokens SET p_inf = p_inf * 0.9 + 1e-4 WHERE pos % 7 = 2", ["p_inf (scan)"]),
    ("UPDATE eval_tokens SET inf_count = inf_count + 1 WHERE pos % 7 = 2", ["inf_count (scan)"]),
    ("UPDATE neighbors SET overlap = overlap + 1 WHERE rank = 2", ["neighbors.overlap (contexts compared)"]),
])
def test_exact_and_word_corruptions_are_caught(fresh_run, intact_checks, statement, names):
    sql(fresh_run, statement)
    failed = failed_names(fresh_run, sample=300, exact_sample=100, **FEW_TYPES)
    for name in names:
        assert intact_checks[name] and name in failed, (name, failed)


def test_shifted_target_rank_is_caught_despite_tie_tolerance(fresh_run, intact_checks):
    """The tie allowance (equal PQ distances at both ranks) does not excuse a real rank error."""
    sql(fresh_run, "UPDATE eval_tokens SET target_rank = target_rank + 5 WHERE target_rank <= 50")
    assert intact_checks["target_rank (re-searched)"] and "target_rank (re-searched)" in failed_names(fresh_run,
                                                                                                      **FEW_TYPES)


def test_a_corrupted_neighbour_block_is_caught(fresh_run, intact_checks):
    """The (eval, plain) block against a fresh search: other entries at some ranks fail the check."""
    from knnlm_core import neighbours

    name = "block eval-plain: ids = a fresh index.search"
    assert intact_checks[name]
    folder = neighbours.block_dir(fresh_run, "eval", "plain")
    path = neighbours.shard_file(folder, 0, "ids")
    ids = np.load(path)
    ids[:, 5:9] = (ids[:, 5:9] + 7) % 5000  # other entries, at their old distances
    np.save(path, ids)
    assert name in failed_names(fresh_run, sample=200, exact_sample=20, **FEW_TYPES)


# ---------------------------------------------------------------- the schema, the registry, a damaged file

SCHEMA_CHECK = "relations, columns and types as declared (knnlm_core/schema.py)"


@pytest.mark.parametrize("statement", [
    "ALTER TABLE neighbors ALTER overlap TYPE INTEGER",  # a type
    "ALTER TABLE eval_words ADD COLUMN extra DOUBLE",  # an undeclared column
    "ALTER TABLE token_types DROP COLUMN eval_count",  # a declared column missing
    "DROP VIEW documents",  # a required relation missing
])
def test_a_relation_off_its_declaration_is_caught(fresh_run, intact_checks, statement):
    sql(fresh_run, statement)
    con = store.open_readonly(fresh_run / "metrics.duckdb")
    try:
        (name, ok, detail), = verify.schema.check_connection(con)
    finally:
        con.close()
    assert intact_checks[SCHEMA_CHECK] and name == SCHEMA_CHECK and not ok, detail


def test_the_registry_follows_the_pipeline_stages():
    """verify's registry is keyed by the pipeline's stage names, in its order; every module is registered once."""
    stages = getattr(importlib.import_module("precompute.stages"), "STAGES", None)
    if stages is None:
        pytest.skip("precompute.stages.STAGES is not there yet")
    assert verify.STAGE_NAMES == tuple(s.name for s in stages)
    assert all(m.STAGE in verify.STAGE_NAMES for m in verify.registry.MODULES)
    assert sum(len(v) for v in verify.CHECKS.values()) == len(verify.registry.MODULES)


def garble_a_late_block(db: Path) -> int:
    """Overwrite 4 KiB of db where the read-only opener still succeeds but reading eval_tokens fails its
    block checksum; the offset. Tried first: 4 KiB into each 256 KiB block (after the 12 KiB of headers)."""
    data = db.read_bytes()
    firsts = list(range(12288 + 262144 + 4096, len(data) - 4096, 262144))
    for at in [*firsts, *range(16384, len(data) - 4096, 16384)]:
        db.write_bytes(data[:at] + b"\xab" * 4096 + data[at + 4096 :])
        try:
            con = store.open_readonly(db)
        except store.RunSchemaError:
            continue
        try:
            con.execute("SELECT * FROM eval_tokens").fetchall()
        except duckdb.Error as err:
            assert "checksum" in str(err)
            return at
        finally:
            con.close()
    raise AssertionError("no 4 KiB garble of the tiny run's database fails a later read")


def test_a_garbled_database_is_bad_input(fresh_run, capsys):
    """Issue 21 item 7: bytes overwritten in the file (a checksum error on a later read) end as one
    `error:` line and exit 2, not as an internal error."""
    garble_a_late_block(fresh_run / "metrics.duckdb")
    assert verify_main(["--run-dir", str(fresh_run), "--sample", "20", "--exact-sample", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "internal error" not in err, err
    assert "metrics.duckdb is garbled" in err and "checksum" in err and "--overwrite" in err
