"""Tests of knnlm_core/schema.py: the one declaration of the run database against the DDL the shipped runs
were built with, against docs/SCHEMA.md and docs/SPEC.md §7, and against the shipped runs' relations."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

from knnlm_core import schema, store

REPO = Path(__file__).resolve().parent.parent
SHIPPED = [REPO / "data" / "runs" / name / store.DB_NAME for name in ("demo", "demo-shakespeare")]
COLUMNS_SQL = """SELECT table_name, column_name, ordinal_position, data_type, is_nullable, column_default
                 FROM information_schema.columns WHERE table_catalog = current_database()
                 AND table_schema = current_schema() AND table_name = ANY(?) ORDER BY table_name, ordinal_position"""


def information_schema(con: duckdb.DuckDBPyConnection, names: list[str]) -> list[tuple]:
    return con.execute(COLUMNS_SQL, [names]).fetchall()


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.parent.name)
def test_generated_ddl_equals_the_ddl_the_shipped_runs_were_built_with(shipped):
    """Same tables, columns, types, order, nullability and defaults as the (hand-written) schema-4 DDL that
    built the shipped databases."""
    names = [t.name for t in schema.TABLES]
    fresh = duckdb.connect()
    fresh.execute(store.SCHEMA_SQL)
    built = duckdb.connect(str(shipped), read_only=True)
    try:
        assert information_schema(fresh, names) == information_schema(built, names)
        assert len(information_schema(fresh, names)) == sum(len(t.columns) for t in schema.TABLES) > 100
    finally:
        fresh.close()
        built.close()


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.parent.name)
def test_every_relation_of_the_shipped_runs_is_as_declared(shipped):
    """Tables and views (documents, doc_bin_stats, the mitigation views) with their columns and types in order."""
    from precompute.verify import schema as verify_schema

    con = duckdb.connect(str(shipped), read_only=True)
    try:
        (_, ok, detail), = verify_schema.check_connection(con)
        present = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()
    assert ok, detail
    assert present - {r.name for r in schema.RELATIONS} == {"mitigation_tokens_data"}  # its storage, documented


def test_store_types_and_write_order_come_from_the_declaration():
    assert store.TABLE_ORDER == {t.name: t.order for t in schema.TABLES}
    assert list(store.TABLE_ORDER)[:2] == ["run", "eval_tokens"] and store.TABLE_ORDER["eval_tokens"] == "pos"
    assert store.MITIGATION_TYPES == schema.types("mitigations") and store.DOCUMENT_TYPES["title"] == "VARCHAR"
    assert store.HIT_KS is schema.HIT_KS and store.RECALL_KS is schema.RECALL_KS


# ---------------------------------------------------------------- docs/SCHEMA.md

def documented_columns(text: str) -> dict[str, list[tuple[str, str]]]:
    """{relation: [(column, type)]} from the `### <relation>` sections' `| column | type | ...` tables."""
    out: dict[str, list[tuple[str, str]]] = {}
    relation = None
    for line in text.splitlines():
        if m := re.match(r"^### (\w+)\s*$", line):
            relation = m.group(1)
        elif line.startswith("| `") and relation is not None:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out.setdefault(relation, []).append((cells[0].strip("`"), cells[1]))
    return out


def doc_problems(text: str) -> list[str]:
    """How docs/SCHEMA.md's column tables differ from the declaration (every column, its type, none extra)."""
    documented = documented_columns(text)
    declared = {r.name: [(c.name, c.type) for c in r.columns] for r in schema.RELATIONS}
    problems = [f"{name} undocumented" for name in declared if name not in documented]
    problems += [f"{name} documented but not declared" for name in documented if name not in declared]
    problems += [f"{name}: documented {documented[name]} != declared {cols}" for name, cols in declared.items()
                 if name in documented and documented[name] != cols]
    return problems


def test_schema_md_documents_every_declared_column_with_its_type():
    assert doc_problems((REPO / "docs" / "SCHEMA.md").read_text()) == []


@pytest.mark.parametrize("edit", [
    ("| `p_knn` | DOUBLE |", "| `p_knn` | FLOAT |"),  # a type
    ("| `gain` | DOUBLE | §7 | database | ln p_knnlm - ln p_lm |\n", ""),  # a column left out
    ("| `title` | VARCHAR |", "| `extra` | INTEGER | ext | database | not declared |\n| `title` | VARCHAR |"),  # extra
    ("### knn_top", "### knn_tops"),  # a relation renamed
], ids=["type", "missing", "extra", "relation"])
def test_an_edited_schema_md_fails(tmp_path, edit):
    text = (REPO / "docs" / "SCHEMA.md").read_text()
    assert edit[0] in text
    copy = tmp_path / "SCHEMA.md"
    copy.write_text(text.replace(edit[0], edit[1], 1))
    assert doc_problems(copy.read_text())


# ---------------------------------------------------------------- docs/SPEC.md §7

def spec_columns() -> dict[str, set[str]]:
    """{table: columns} of the SPEC §7 storage contract, from its bullets `- `table` ...: `a, b, ...``."""
    spec = (REPO / "docs" / "SPEC.md").read_text()
    section = spec[spec.index("## 7."): spec.index("## 8.")]
    out = {}
    for bullet in re.split(r"\n  - ", section)[1:]:
        bullet = bullet.split("\n\n")[0]
        name = re.match(r"`(\w+)", bullet).group(1)
        listing = [s for s in re.findall(r"`([^`]+)`", bullet) if "," in s][-1]
        listing = listing.removeprefix(f"{name}(").removesuffix(")")
        out[name] = {c.strip() for c in listing.split(",")}
    return out


def test_the_declared_section_7_columns_are_the_spec_s():
    listed = spec_columns()
    assert set(listed) == {"run", "eval_tokens", "token_types", "neighbors", "datastore_tokens"}
    declared = {r.name: {c.name for c in r.columns if c.spec == "§7"} for r in schema.RELATIONS}
    assert {name: cols for name, cols in declared.items() if cols} == listed
    assert {"doc_id", "ctx_match_len", "copy_share"} <= {c.name for c in schema.EVAL_TOKENS.columns}
