"""The README's numbers about the shipped runs equal their databases (issue 21; docs/readme_numbers.py).

The generator runs in check mode in-process against the real README; an edited copy must fail naming the
edited number; and a few quoted figures are recomputed here with plain numpy over the tables, so the
generated blocks are checked against an independent computation, not only against themselves.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import pytest

from docs import readme_numbers as rn

REPO = Path(__file__).resolve().parent.parent
DEMO, OUT = REPO / "data" / "runs" / "demo" / "metrics.duckdb", REPO / "data" / "runs" / "demo-shakespeare" / "metrics.duckdb"


@pytest.fixture(scope="module")
def blocks() -> dict[str, str]:
    return rn.generate()


def _table(path: Path, sql: str) -> dict[str, np.ndarray]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {k: v.to_numpy() for k, v in con.execute(sql).fetchdf().items()}
    finally:
        con.close()


def test_readme_numbers_match_the_shipped_runs(blocks, monkeypatch, capsys):
    """`python -m docs.readme_numbers --check` on the committed README: exit 0, nothing listed (the blocks
    generated once for this module, so the generator runs once)."""
    monkeypatch.setattr(rn, "generate", lambda: blocks)
    assert rn.main(["--check"]) == 0, capsys.readouterr().out


def test_an_edited_number_fails_and_is_named(blocks, tmp_path):
    """One number of a copy of the README changed (demo's PPL kNN-LM): the check fails naming both values;
    regenerating restores the README byte for byte."""
    text = rn.README.read_text(encoding="utf-8")
    ev = _table(DEMO, "SELECT nll_knnlm FROM eval_tokens")
    true = f"{np.exp(ev['nll_knnlm'].mean()):.2f}"  # independent: exp(mean NLL) over the table
    edited = f"{float(true) + 0.01:.2f}"
    head = re.search(r"<!-- numbers:begin headline -->.*?<!-- numbers:end -->", text, re.S)
    assert head and f"| {true} |" in head.group(0)
    copy = tmp_path / "README.md"
    copy.write_text(text[:head.start()] + head.group(0).replace(f"| {true} |", f"| {edited} |", 1)
                    + text[head.end():], encoding="utf-8")
    diff = rn.differences(copy.read_text(encoding="utf-8"), blocks)
    assert len(diff) == 1 and "headline" in diff[0] and edited in diff[0] and true in diff[0], diff
    assert rn.rewrite(copy.read_text(encoding="utf-8"), blocks) == text


def test_check_mode_reports_text_edits_and_missing_blocks(blocks, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rn, "generate", lambda: blocks)
    text = rn.README.read_text(encoding="utf-8")
    worded = text.replace("(helps)", "(harms)", 1)
    assert rn.differences(worded, blocks) == ["block 'token-bins': text differs (numbers agree); regenerate it"]
    copy = tmp_path / "README.md"
    copy.write_text(re.sub(r"<!-- numbers:begin words -->.*?<!-- numbers:end -->\n", "", text, flags=re.S),
                    encoding="utf-8")
    assert rn.main(["--check", "--readme", str(copy)]) == 1
    assert "block 'words': missing from the README" in capsys.readouterr().out


def test_quoted_figures_equal_a_numpy_recomputation(blocks):
    """Overall PPLs and change, word PPL, and the IDF variant's pooled rare-bin change, from the raw tables."""
    for path, name in ((DEMO, "demo"), (OUT, "demo-shakespeare")):
        ev = _table(path, "SELECT nll_lm, nll_knnlm FROM eval_tokens")
        lm, knn = np.exp(ev["nll_lm"].mean()), np.exp(ev["nll_knnlm"].mean())
        row = next(line for line in blocks["headline"].splitlines() if line.startswith(f"| `{name}`"))
        assert rn.ppl(lm) in row and rn.ppl(knn) in row and f"{100 * (knn / lm - 1):+.1f}%" in row, row
    words = _table(DEMO, "SELECT nll_lm, nll_knnlm FROM eval_words")
    assert f"{np.exp(words['nll_lm'].mean()):.2f} → {np.exp(words['nll_knnlm'].mean()):.2f}" in blocks["words"]
    t = _table(DEMO, """SELECT e.freq_bin, e.p_lm, e.nll_knnlm, m.p_knn_idf FROM eval_tokens e
                        JOIN mitigation_tokens m USING (pos)""")
    lam = float(_table(DEMO, "SELECT lam FROM mitigations WHERE variant = 'idf'")["lam"][0])
    rare = (t["freq_bin"] >= 0) & (t["freq_bin"] <= 2)
    nll_idf = -np.log(lam * t["p_knn_idf"][rare] + (1 - lam) * t["p_lm"][rare])
    change = np.exp(nll_idf.mean() - t["nll_knnlm"][rare].mean()) - 1
    idf_row = next(line for line in blocks["mitigation-groups"].splitlines() if line.startswith("| IDF weighting"))
    assert idf_row.split("|")[2].strip().strip("*").startswith(f"{100 * change:+.1f}%"), idf_row
