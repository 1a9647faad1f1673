"""bench/device_check.py (issue 23 item 5) on the CPU: its `--small` run writes every figure of every part, and
the planner's GPU rates (`device_rates.json`) are exactly the Rates fields it measured, each with its source and
equal to the figure recomputed here from the sizes (the planner's FLOP and visit counts, written out by hand).

One subprocess serves the module (~25 s on the 2-core CI machine, most of it imports and the tiny model's
build). Ray is made unimportable in it (`--without ray`): the Ray part must then be skipped with its reason, and
start_s left out of the rates. The Ray part itself (ray.init and two actor-pool starts, ~20 s more here) runs only
with KNNLM_DEVICE_CHECK_RAY=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from knnlm_core.windows import plan_windows
from precompute.plan.__main__ import read_rates
from precompute.plan.cost import Rates

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "device_check.py"
FIGURES = {  # part -> figures that must be present and positive
    "extract": ("keys_extracted", "device_seconds", "device_keys_per_s", "device_flops", "cmp_keys",
                "cmp_device_keys_per_s", "cmp_cpu_keys_per_s"),
    "encode": ("keys_encoded", "device_keys_per_s", "device_flops", "cpu_keys", "cpu_keys_per_s", "train_seconds"),
    "exact": ("device_queries", "device_queries_per_s", "device_flops", "cpu_queries", "cpu_queries_per_s"),
    "ivfpq": ("device_queries", "device_queries_per_s", "device_visits_per_s", "cpu_queries", "cpu_queries_per_s"),
}
HAVE_TORCH_IVFPQ = importlib.util.find_spec("precompute.torch_ivfpq") is not None


def run_check(out: Path, *extra: str) -> tuple[dict, dict, str]:
    """(device_check.json, device_rates.json, stdout) of one --small run."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out), "--budget-s", "150", *extra],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    read = lambda name: json.loads((out / name).read_text())  # noqa: E731
    return read("device_check.json"), read("device_rates.json"), proc.stdout


@pytest.fixture(scope="module")
def small_check(tmp_path_factory) -> tuple[dict, dict, str]:
    return run_check(tmp_path_factory.mktemp("device-check"), "--without", "ray")


def rates_problems(rates: dict) -> list[str]:
    """What makes a device_rates.json unfit for the planner: a field Rates lacks, a value that is not a positive
    number, a rate without its "source" line (or a source without its rate)."""
    names = {f.name for f in fields(Rates)}
    values = {k: v for k, v in rates.items() if k != "source"}
    problems = [f"unknown field {k}" for k in values if k not in names]
    problems += [f"{k} = {v!r}" for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float))
                 or not v > 0]
    source = rates.get("source")
    if not isinstance(source, dict) or set(source) != set(values):
        problems.append(f"source {source!r} does not name exactly the rates {sorted(values)}")
    return problems


def expected_rates(report: dict) -> dict[str, float]:
    """The GPU rates recomputed from the sizes and the timed rates of the report (GPT-2 body: 12 L d² weights)."""
    s, parts = report["sizes"], report["parts"]
    ex = parts["extract"]
    windows = plan_windows(ex["keys_extracted"] + 1, ex["max_context"], ex["stride"])
    tokens = sum(w.end - w.begin for w in windows)
    sq = sum((w.end - w.begin) ** 2 for w in windows)
    body = 12 * s["layers"] * s["d"] ** 2
    nlist = int(s["factory"].split(",")[0][3:])
    out = {"gpu_flops": (2 * body * tokens + 2 * s["layers"] * s["d"] * sq) / ex["device_seconds"],
           "gpu_encode_flops": parts["encode"]["device_keys_per_s"] * 2 * s["d"] * (nlist + 256),
           "gpu_exact_flops": parts["exact"]["device_queries_per_s"] * 2 * s["entries"] * s["d"]}
    if "device_queries_per_s" in parts["ivfpq"]:
        out["gpu_visits"] = parts["ivfpq"]["device_queries_per_s"] * s["nprobe"] * s["entries"] / nlist
    return out


def mismatches(rates: dict, expected: dict[str, float], rel: float = 1e-9) -> list[str]:
    """Rates missing, extra, or off their recomputed value by more than `rel` (float rounding only)."""
    out = sorted(set(expected) ^ (set(rates) - {"source"}))
    return out + [k for k in expected if k in rates and abs(rates[k] - expected[k]) > rel * abs(expected[k])]


def test_small_check_has_every_figure(small_check):
    report, _, stdout = small_check
    assert report["device_kind"] == "cpu" and report["small"]
    for part, figures in FIGURES.items():
        got = report["parts"][part]
        if part == "ivfpq" and not HAVE_TORCH_IVFPQ:
            assert "torch_ivfpq" in got["skipped"]
            continue
        assert "skipped" not in got, got
        assert all(got[f] > 0 for f in figures), {f: got.get(f) for f in figures}
    assert report["parts"]["extract"]["keys_extracted"] == report["sizes"]["entries"]  # nothing synthesized
    # the device and CPU sides agree: same keys (both float32 on the CPU here), exact ids, codes, IVFPQ lists
    assert report["parts"]["extract"]["cmp_rel_diff"] <= 1e-5
    assert report["parts"]["exact"]["same_ids_share"] >= 0.999
    assert report["parts"]["encode"]["codes_differing_share"] <= 1e-3
    if HAVE_TORCH_IVFPQ:
        assert report["parts"]["ivfpq"]["id_overlap_share"] >= 0.98
    assert report["wall_seconds"] < report["budget_s"]
    # a missing module skips its part with the reason, and the check goes on
    assert "ray cannot be imported" in report["parts"]["ray"]["skipped"]
    assert "ray: skipped: ray cannot be imported" in stdout


def test_rates_are_planner_fields_equal_to_the_recomputed_figures(small_check, tmp_path):
    report, rates, _ = small_check
    assert rates_problems(rates) == []
    (tmp_path / "rates.json").write_text(json.dumps(rates))
    planner = read_rates(tmp_path / "rates.json")  # the planner's --rates reader takes the file
    assert all(getattr(planner, k) == v for k, v in rates.items() if k != "source")
    assert mismatches(rates, expected_rates(report)) == []
    assert "start_s" not in rates  # Ray was not run
    assert all(line.startswith("not a GPU rate") for line in rates["source"].values())  # --small: CPU figures


def test_the_checks_catch_edited_rates(small_check):
    report, rates, _ = small_check
    expected = expected_rates(report)
    assert mismatches({**rates, "gpu_flops": rates["gpu_flops"] * 1.01}, expected) == ["gpu_flops"]
    assert mismatches({k: v for k, v in rates.items() if k != "gpu_exact_flops"}, expected) == ["gpu_exact_flops"]
    assert rates_problems({**rates, "gpu_flopz": 1.0}) != []
    assert rates_problems({**rates, "gpu_flops": -1.0}) != []
    assert rates_problems({**rates, "source": {}}) != []


@pytest.mark.skipif(os.environ.get("KNNLM_DEVICE_CHECK_RAY") != "1" or importlib.util.find_spec("ray") is None,
                    reason="the Ray part (~20 s) runs with KNNLM_DEVICE_CHECK_RAY=1 and ray installed")
def test_ray_part(tmp_path):
    report, rates, _ = run_check(tmp_path, "--parts", "extract,encode,ray")
    ray = report["parts"]["ray"]
    assert "skipped" not in ray, ray
    assert ray["device_kind"] == "cpu" and ray["device_keys_per_s"] > 0 and ray["ray_init_seconds"] > 0
    assert rates["start_s"] == ray["device_start_seconds"] and rates_problems(rates) == []


def test_ivfpq_from_codes_searches_like_from_faiss():
    """Part 4 without faiss builds its TorchIVFPQ from part 2's codes (`ivfpq_from_codes`): it must search exactly
    as `TorchIVFPQ.from_faiss` over a faiss index filled with the same codes; edited codes must not."""
    torch_ivfpq = pytest.importorskip("precompute.torch_ivfpq")
    import faiss
    import numpy as np

    from bench.device_check import ivfpq_from_codes
    from knnlm_core.index import add_codes, ivfpq_codec

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((32, 32)).astype(np.float32) * 3
    keys = centres[rng.integers(0, 32, 4000)] + rng.standard_normal((4000, 32), dtype=np.float32)  # (4000, 32)
    index = faiss.index_factory(32, "IVF8,PQ4")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.niter, ivf.pq.cp.niter, ivf.do_polysemous_training = 4, 4, False  # short k-means: ~1 s
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # tiny k-means: OpenMP's spin-waits cost 10x on a loaded 2-core machine
    try:
        index.train(keys)
    finally:
        faiss.omp_set_num_threads(threads)
    codes = index.sa_encode(keys)  # (4000, 1 + 4) uint8
    add_codes(index, codes, 0)
    queries = keys[:40] + rng.standard_normal((40, 32), dtype=np.float32)
    want = torch_ivfpq.TorchIVFPQ.from_faiss(index, "cpu", precomputed=True).search(queries, 20, 3)
    got = ivfpq_from_codes(ivfpq_codec(index), codes, "cpu").search(queries, 20, 3)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    edited = codes.copy()
    edited[:, -1] = np.roll(edited[:, -1], 1)  # each entry gets its neighbour's last sub-quantizer code
    bad = ivfpq_from_codes(ivfpq_codec(index), edited, "cpu").search(queries, 20, 3)
    assert not np.array_equal(bad[0], want[0])
