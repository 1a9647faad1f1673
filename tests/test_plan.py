"""Tests of precompute/plan/: counts against hand computation and built runs, every stage in the
plan, the exact-search "auto" rule, and the summary line a run prints at start.

The tiny run of conftest (6,000 datastore tokens, 500 evaluation tokens, a 2 x 64 GPT-2,
IVF8,PQ8x4) is counted by hand; its real files (key shards, values, index) must match the
plan's byte counts. The paper's config gives 374 GB of fp16 keys (117M x 1600 x 2 bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import MITIGATIONS, TINY_RUN_CONFIG, write_toml

from knnlm_core.config import RunConfig, load_config
from knnlm_core.windows import plan_windows
from precompute.cli import UsageError
from precompute.plan import (
    KNOWN_MODELS,
    Machine,
    Rates,
    decide_exact,
    estimate,
    plan_facts,
    plan_summary,
    run_facts,
    stage_seconds,
)
from precompute.plan.__main__ import main as plan_main
from precompute.plan.__main__ import read_rates, read_rates_files
from precompute.plan.calibrate import (
    BUILT_IN,
    GPU_RATES,
    FinishedRun,
    built_in_sources,
    calibration_config,
    fit_to_runs,
    informative,
    is_duration,
    parse_rates,
    plan_of,
    rates_json,
    read_run,
    run_shares,
    timed_rates,
)

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs/gpt2-xl-wikitext103.toml"
LOCAL_2 = Machine(0, 2, 1, "local")
PIPELINE_STAGES = {"datastore", "eval_lm", "valid_lm", "index", "whiten", "search", "types", "exact", "suffix",
                   "mitigate", "words", "database"}


@pytest.fixture(scope="module")
def tiny_cfg(tiny_model):
    return replace(RunConfig(), model=str(tiny_model), lam=0.25, **TINY_RUN_CONFIG).validate()


@pytest.fixture(scope="module")
def tiny_facts(tiny_cfg):
    return run_facts(tiny_cfg)  # tokenized here (the tiny model's tokenizer)


def paper(**overrides) -> tuple[RunConfig, object]:
    cfg = load_config(PAPER, overrides)
    return cfg, run_facts(cfg, entries=117_000_000, eval_positions=286_220)


def rows(work) -> dict:
    return {w.label: w for w in work}


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "precompute.plan", *args], cwd=REPO, capture_output=True, text=True)


def test_tiny_config_counts_by_hand(tiny_cfg, tiny_facts):
    f = tiny_facts
    assert (f.n, f.t) == (5999, 499)  # 6,000 and 500 tokens: one entry / position fewer (the last has no target)
    assert (f.shape.d, f.shape.layers, f.shape.ffn, f.shape.positions) == (64, 2, 256, 128)
    work = rows(estimate(tiny_cfg, f, Rates(), LOCAL_2))
    assert work["datastore"].written == 5999 * (64 * 2 + 4)  # fp16 keys + int32 values
    assert work["index"].written == 2 * 5999 * (4 + 8) + 16 * 5999  # PQ8x4 = 4-byte codes + 8-byte ids, twice; errors
    assert work["eval_lm"].count == 499
    # forward FLOP: 2 x body parameters per token + attention 2 x layers x d x window length², windows 128 / 64
    lengths = [w.end - w.begin for w in plan_windows(6000, 128, 64)]
    body = 2 * (4 * 64 * 64 + 2 * 64 * 256)
    assert work["datastore"].flop == 2 * body * sum(lengths) + 2 * 2 * 64 * sum(x * x for x in lengths)
    # the neighbour block: k neighbours of every query (id 8, value 4, two float32 distances); brute force 2 T N d
    assert work["search: eval x plain"].written == 499 * 64 * 20
    # d 64 < 2 x 64: no subspace bound; the faiss shortlist of k + k/8 + 32 = 104 keys is reranked
    assert work["exact"].flop == 2 * 499 * 5999 * 64 + 3 * 499 * 104 * 64


def test_plan_matches_the_files_of_a_built_run(tiny_cfg, tiny_facts, tiny_run):
    f = tiny_facts
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert (f.n, f.t) == (manifest["n_entries"], manifest["n_eval"])
    with np.load(tiny_run / "types.npz") as types:
        assert f.types == int((types["freq"] > 0).sum())
    work = rows(estimate(tiny_cfg, f, Rates(), LOCAL_2))
    data_bytes = sum(np.load(p, mmap_mode="r").nbytes for p in (tiny_run / "keys").glob("shard_*.npy"))
    data_bytes += np.load(tiny_run / "values.npy", mmap_mode="r").nbytes
    assert work["datastore"].written == data_bytes
    index_bytes = (tiny_run / "index.faiss").stat().st_size  # codes + ids + centroids and codebooks (< 16 kB)
    assert f.n * (4 + 8) <= index_bytes <= f.n * (4 + 8) + 16_000
    block = tiny_run / "neighbours" / "eval-plain"
    block_bytes = sum(np.load(p, mmap_mode="r").nbytes for p in block.rglob("*.npy"))
    assert block_bytes == work["search: eval x plain"].written


def test_every_pipeline_stage_is_planned(mitigated_run, tiny_model):
    """The stages a real build with a validation corpus and both whitenings records are all in its plan."""
    cfg = load_config(None, {"model": str(tiny_model), **TINY_RUN_CONFIG, **MITIGATIONS})
    built = set(json.loads((mitigated_run / "stages.json").read_text())) - {"tokenize_datastore", "tokenize_eval"}
    planned = {w.stage for w in estimate(cfg, plan_facts(cfg, 5999, 499), Rates(), LOCAL_2, exact_runs=True)}
    assert built <= planned and planned == PIPELINE_STAGES


def test_cli_lists_every_stage_and_part(tmp_path, tiny_model, mitigated_run):
    cfg = write_toml(tmp_path / "all.toml", {"model": str(tiny_model), **TINY_RUN_CONFIG, **MITIGATIONS})
    out = plan_cli("--config", str(cfg), "--gpus", "0", "--cpus", "2", "--measured", str(mitigated_run))
    assert out.returncode == 0, out.stderr
    labels = [line[:30].strip() for line in out.stdout.splitlines()[2:]]  # the label column is 30 wide
    parts = [f"{s} x {i}" for i in ("plain", "zipfian", "entries") for s in ("eval", "valid")]
    parts += [f"{k} {what}" for k in ("zipfian", "entries") for what in ("fit", "index")]
    for name in [*PIPELINE_STAGES, *parts]:
        assert name in labels, f"{name} missing from the plan:\n{out.stdout}"
    assert any(label.startswith("valid scores") for label in labels) and any(
        label.startswith("eval scores") for label in labels)
    assert "exact search: auto: on" in out.stdout and "disk: shared storage" in out.stdout


def test_wikitext2_preset_on_two_cores_lists_exact_and_mitigations():
    out = plan_cli("--config", "configs/wikitext2.toml", "--gpus", "0", "--cpus", "2", "--entries", "2448381",
                   "--eval-positions", "286220")
    assert out.returncode == 0, out.stderr
    table = {line[:30].strip(): line for line in out.stdout.splitlines()}
    assert "not run" not in table["exact"]  # auto decides on: the table counts it
    for name in ("valid_lm", "whiten", "mitigate", "zipfian index", "eval x entries", "valid x plain"):
        assert name in table


def test_paper_setting_keys_are_374_gb():
    cfg, f = paper()
    assert f.shape == KNOWN_MODELS["gpt2-xl"]
    keys = rows(estimate(cfg, f, Rates(), Machine(8, 128)))["datastore"].written - 4 * f.n
    assert keys == 117_000_000 * 1600 * 2 and round(keys / 1e9) == 374


def test_map_time_divides_over_gpus():
    cfg, f = paper()
    rates = Rates()
    t8, t16 = (rows(estimate(cfg, f, rates, Machine(g, 128)))["datastore"].seconds for g in (8, 16))
    fixed = f.shape.params * 2 / rates.load_bytes + rates.start_s  # model load + pool start, paid once per worker
    assert (t8 - fixed) == pytest.approx(2 * (t16 - fixed))


def test_a_shard_is_never_split_over_workers():
    """286,220 queries in shards of 131,072 are 3 shards: more than 3 workers do not help, smaller shards do."""
    cfg, f = paper(shard_size=131072)
    eval_block = {w: rows(estimate(cfg, f, Rates(), Machine(0, 16 * w + 1, 1)))["search: eval x plain"].seconds
                  for w in (3, 7)}
    assert eval_block[3] == pytest.approx(eval_block[7])
    small = replace(cfg, shard_size=16384)
    assert rows(estimate(small, f, Rates(), Machine(0, 7 * 16 + 1, 1)))["search: eval x plain"].seconds < eval_block[7]


def test_mitigation_stages_are_planned_only_with_a_validation_corpus(tiny_cfg, tiny_facts):
    assert not {"valid_lm", "whiten", "mitigate"} & {w.stage for w in estimate(tiny_cfg, tiny_facts, Rates(), LOCAL_2)}
    with_valid = replace(tiny_cfg, valid_corpus=TINY_RUN_CONFIG["eval_corpus"], valid_limit_tokens=300)
    f = run_facts(with_valid)
    assert f.t_valid == 299  # tokenized here: 300 tokens
    seconds, blocks = {}, {}
    for whiten in ("none", "zipfian", "entries,zipfian"):
        cfg = replace(with_valid, whiten=whiten).validate()
        work = estimate(cfg, f, Rates(), LOCAL_2)
        assert rows(work)["valid_lm"].count == 299
        blocks[whiten] = [w.part for w in work if w.stage == "search"]
        assert sum(w.count for w in work if w.stage == "mitigate") == len(blocks[whiten]) // 2 * (f.t + f.t_valid)
        seconds[whiten] = stage_seconds(work)
    assert blocks["entries,zipfian"] == [f"{s} x {i}" for i in ("plain", "entries", "zipfian") for s in ("eval", "valid")]
    assert "whiten" not in seconds["none"]
    assert seconds["none"]["search"] < seconds["zipfian"]["search"] < seconds["entries,zipfian"]["search"]


def test_auto_exact_flips_with_the_machine():
    cfg, f = paper(exact_search="auto")
    off, why_off = decide_exact(cfg, f, Machine(0, 128))  # CPU brute force over 117M keys: tens of hours
    on, why_on = decide_exact(cfg, f, Machine(8, 128))
    assert (off, on) == (False, True)
    assert why_off.startswith("auto: off") and "0 GPUs, 128 CPU cores" in why_off and "more than 4.0 h" in why_off
    assert why_on.startswith("auto: on") and "8 GPUs" in why_on
    # the rule, checked against the plan's own estimates
    for machine, decided in ((Machine(0, 128), off), (Machine(8, 128), on)):
        seconds = stage_seconds(estimate(cfg, f, Rates(), machine, exact_runs=True))
        exact = seconds.pop("exact")
        assert decided == (exact <= 600 or (exact <= sum(seconds.values()) and exact <= 4 * 3600))


def test_auto_exact_is_on_for_a_tiny_datastore_and_configured_values_win(tiny_cfg, tiny_facts):
    f = tiny_facts
    assert decide_exact(replace(tiny_cfg, exact_search="auto"), f, Machine(0, 1, 1, "local"))[0]
    cfg, big = paper()
    assert decide_exact(replace(cfg, exact_search="on"), big, Machine(0, 16)) == (True, "exact_search = on")
    assert decide_exact(replace(tiny_cfg, exact_search="off"), f, Machine(8, 128)) == (False, "exact_search = off")
    no_plan = decide_exact(replace(tiny_cfg, exact_search="auto"), None, LOCAL_2)  # the plan failed: off, and why
    assert no_plan[0] is False and "could not estimate" in no_plan[1]


def test_plan_summary_is_one_line_and_never_raises(tiny_cfg):
    f = plan_facts(tiny_cfg, 5999, 499)
    text = plan_summary(tiny_cfg, f, LOCAL_2)
    assert 1 <= len(text.splitlines()) <= 2
    assert text.startswith("plan: about ") and "0 GPUs, 2 CPU cores" in text and "the longest stage is " in text
    longest = max(stage_seconds(estimate(tiny_cfg, f, Rates(), LOCAL_2, exact_runs=True)).items(), key=lambda x: x[1])
    assert f"the longest stage is {longest[0]} " in text
    assert plan_summary(tiny_cfg, None, LOCAL_2) == "" and plan_summary(tiny_cfg, f, None) == ""
    assert plan_facts(replace(tiny_cfg, model="/no/such/model"), 10, 10) is None


def test_plan_facts_without_tokenizing_match_the_counts(tiny_cfg, tiny_facts):
    counted, tokenized = plan_facts(tiny_cfg, 5999, 499), tiny_facts
    assert (counted.n, counted.t, counted.tokens_ds, counted.sq_ev) == (tokenized.n, tokenized.t, tokenized.tokens_ds,
                                                                        tokenized.sq_ev)
    assert counted.source == "counted by the run"


def test_rates_written_before_a_rate_existed_keep_its_default(tmp_path):
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"cpu_flops": 1.0e10, "visits": 1.0e6}))
    rates = read_rates(path)
    assert (rates.cpu_flops, rates.visits, rates.gpu_exact_flops) == (1.0e10, 1.0e6, Rates().gpu_exact_flops)


def test_cli_bad_input_is_one_line_exit_2():
    out = plan_cli("--config", "nope.toml")
    assert out.returncode == 2 and out.stderr.startswith("error: config file not found")
    assert len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- rates: sources, files, the fit to finished runs

def scaled_run(run: FinishedRun, factor: float) -> FinishedRun:
    """`run` with stage seconds made by hand: `factor` x its plan at the built-in rates (a machine `factor` x
    slower)."""
    return replace(run, seconds={s: factor * t for s, t in plan_of(run, Rates()).items()}, train_seconds=0.0)


def test_read_run_counts_its_files(mitigated_run):
    run = read_run(mitigated_run)
    assert run.facts.n == len(np.load(mitigated_run / "values.npy"))
    assert run.facts.t == len(np.load(mitigated_run / "eval_ids.npy")) - 1
    assert run.facts.t_valid == len(np.load(mitigated_run / "valid_ids.npy")) - 1 == 499
    stages = json.loads((mitigated_run / "stages.json").read_text())
    assert run.seconds == {k: v["seconds"] for k, v in stages.items()} and "exact" in run.seconds
    assert run.machine == Machine(0, 2, 1, "local")


def test_fit_recovers_a_uniformly_slower_machine(mitigated_run):
    """Stage seconds 2x the built-in plan: every rate a stage depends on ends at half the built-in throughput
    (twice the duration); the GPU rates, which no stage of a CPU run depends on, stay built-in and assumed."""
    run = scaled_run(read_run(mitigated_run), 2.0)
    fitted, sources = fit_to_runs(Rates(), built_in_sources(), [run])
    used = {n for s, parts in run_shares(run, Rates()).items() if informative(run, s) for n in parts}
    assert {"cpu_flops", "visits", "exact_flops", "query_s", "score_elems"} <= used
    for name in used:
        want = getattr(Rates(), name) * (2.0 if is_duration(name) else 0.5)
        assert getattr(fitted, name) == pytest.approx(want, rel=1e-3), name
        assert sources[name].startswith("measured: fitted to the ") and "x" in sources[name]
    for name in GPU_RATES:
        assert getattr(fitted, name) == getattr(Rates(), name) and sources[name] == BUILT_IN
    plan = plan_of(run, fitted)
    assert all(plan[s] == pytest.approx(run.seconds[s], rel=1e-3) for s in plan if informative(run, s))


def test_fit_combines_runs_by_seconds_weighted_geometric_mean(mitigated_run):
    """Two runs of one config measured 2x and 4x the plan: their weights are 1 : 2 (share x measured seconds),
    so the rates move by 2 ** ((1 x 1 + 2 x 2) / 3) = 2 ** (5 / 3)."""
    base = read_run(mitigated_run)
    runs = [replace(scaled_run(base, 2.0), name="a"), replace(scaled_run(base, 4.0), name="b")]
    fitted, sources = fit_to_runs(Rates(), built_in_sources(), runs)
    factor = 2 ** (5 / 3)
    assert fitted.cpu_flops == pytest.approx(Rates().cpu_flops / factor, rel=1e-3)
    assert fitted.query_s == pytest.approx(Rates().query_s * factor, rel=1e-3)
    assert "runs a, b" in sources["cpu_flops"]
    # an edited stage time moves only the rates that stage depends on
    edited = [replace(base, seconds={**scaled_run(base, 1.0).seconds, "suffix": 10 * plan_of(base, Rates())["suffix"]})]
    moved, _ = fit_to_runs(Rates(), built_in_sources(), edited)
    assert moved.sa_tokens < Rates().sa_tokens / 2 and moved.cpu_flops == pytest.approx(Rates().cpu_flops, rel=1e-3)


def test_fit_takes_the_training_rate_from_the_index_stages_own_seconds(mitigated_run):
    """k-means timed alone (the index stage's index_train_seconds) gives the rate of its larger part directly:
    FLOP counted by hand for the tiny run (IVF8,PQ8x4, d 64, 25 iterations: coarse 8 centroids on at most
    256 x 8 keys, PQ 256 per sub-space on its 5,999 keys), the coarse part at the built-in rate, 2 driver
    cores; the fit leaves it there while it moves the rest."""
    run = replace(scaled_run(read_run(mitigated_run), 3.0), train_seconds=0.5)
    n, d = run.facts.n, 64
    coarse, pq = 2 * 25 * d * 2048 * 8, 2 * 25 * d * n * 256
    fitted, sources = fit_to_runs(Rates(), built_in_sources(), [run])
    assert fitted.pq_train_flops == pytest.approx(pq / (0.5 - coarse / Rates().train_flops / 2) / 2, rel=1e-9)
    assert fitted.train_flops == Rates().train_flops and sources["train_flops"] == BUILT_IN
    assert sources["pq_train_flops"].startswith("measured: the index stage's k-means seconds")
    assert fitted.cpu_flops == pytest.approx(Rates().cpu_flops / 3, rel=1e-3)


def test_calibration_code_path_builds_rates(mitigated_run):
    """What --calibrate does after its build, on a built run: timed calls, then the fit; every rate a
    finite positive number and the run's plan matched where the plan has a rate to move."""
    run = read_run(mitigated_run)
    timed, sources = timed_rates(mitigated_run, run, log=print)
    assert {n for n, s in sources.items() if s.startswith("measured")} >= {"flat_flops", "types_bytes", "visits",
                                                                          "train_flops"}
    rates, sources = fit_to_runs(timed, sources, [run], "the calibration run")
    assert all(np.isfinite(v) and v > 0 for v in vars(rates).values())
    parsed, again = parse_rates(json.loads(rates_json(rates, sources)), Rates(), built_in_sources(), "x")
    assert parsed == rates and again == sources
    cfg = calibration_config("configs/ci-tiny.toml")
    planned = {w.stage for w in estimate(cfg, plan_facts(cfg, 199_999, 9_999), rates, LOCAL_2, exact_runs=True)}
    assert planned == PIPELINE_STAGES


def test_rates_files_merge_in_order_and_keep_sources(tmp_path):
    cpu, gpu = tmp_path / "cpu.json", tmp_path / "gpu.json"
    cpu.write_text(rates_json(replace(Rates(), visits=3e6), {**built_in_sources(), "visits": "measured: timed"}))
    gpu.write_text(json.dumps({"gpu_flops": 2e14, "source": {"gpu_flops": "measured: device check"}}))
    rates, sources = read_rates_files([cpu, gpu])
    assert (rates.visits, rates.gpu_flops, rates.cpu_flops) == (3e6, 2e14, Rates().cpu_flops)
    assert (sources["visits"], sources["gpu_flops"], sources["cpu_flops"]) == ("measured: timed",
                                                                             "measured: device check", BUILT_IN)
    (tmp_path / "bare.json").write_text(json.dumps({"gpu_exact_flops": 1e13}))  # no source: named after the file
    assert read_rates_files([tmp_path / "bare.json"])[1]["gpu_exact_flops"] == f"measured: read from {tmp_path}/bare.json"


@pytest.mark.parametrize("content", ['{"visits": -1}', '{"visits": "fast"}', '{"speed": 1.0}', '[1, 2]',
                                     '{"visits": 1e6, "source": {"visits": 3}}', "{not json"])
def test_a_bad_rates_file_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / "rates.json"
    path.write_text(content)
    with pytest.raises(UsageError) as err:
        read_rates_files([path])
    assert len(str(err.value).splitlines()) == 1 and "rerun --calibrate" in str(err.value)


def test_cli_says_which_rates_are_measured(tmp_path, tiny_model, mitigated_run, capsys):
    """Each stage row says whether its rates are measured; --rates-from-run writes rates that make them so.
    (In process, sizes given: main() is the command line without a fresh interpreter or a tokenizer.)"""
    def cli(*args: str) -> tuple[int, str, str]:
        code = plan_main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    cfg = write_toml(tmp_path / "tiny.toml", {"model": str(tiny_model), **TINY_RUN_CONFIG})
    sizes = ("--config", str(cfg), "--entries", "5999", "--eval-positions", "499", "--cpus", "2", "--executor", "local")
    code, assumed, err = cli(*sizes)
    assert code == 0, err
    stage_rows = [line for line in assumed.splitlines() if "[rates: " in line]
    assert len(stage_rows) == len(PIPELINE_STAGES - {"valid_lm", "whiten", "mitigate"})
    assert all("[rates: assumed]" in r for r in stage_rows)
    assert "rates: 0 of the" in assumed and "none: the built-in H100-host rates" in assumed
    out = tmp_path / "fitted.json"
    code, _, err = cli("--rates-from-run", str(mitigated_run), "--out", str(out))
    assert code == 0, err
    assert json.loads(out.read_text())["source"]["cpu_flops"].startswith("measured: fitted to the datastore")
    code, measured, err = cli(*sizes, "--rates", str(out))
    rows = {line[:30].strip(): line for line in measured.splitlines()}
    assert code == 0 and "[rates: measured]" in rows["datastore"] and "[rates: measured]" in rows["search"]
    code, _, err = cli("--rates-from-run", str(tmp_path))  # no stages.json there
    assert code == 2 and len(err.strip().splitlines()) == 1 and "stages.json" in err
