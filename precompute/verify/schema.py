"""The database's relations against the declared schema (stage `database`; SPEC §7, knnlm_core/schema.py):
every required relation present, every relation with exactly its declared columns, types and order (an
optional relation or column may be absent)."""

from __future__ import annotations

from knnlm_core import schema

from .common import Check, RunData

STAGE = "database"


def column_problems(columns: dict[str, list[tuple[str, str]]]) -> list[str]:
    """What differs between {relation: [(column, type)] in order} and the declaration; [] when nothing does."""
    problems = []
    for rel in schema.RELATIONS:
        got = columns.get(rel.name)
        if got is None:
            if not rel.optional:
                problems.append(f"{rel.name} missing")
            continue
        want = schema.expected_columns(rel.name, [c for c, _ in got])
        if got != want:
            extra = [f"{c} {t}" for c, t in got if (c, t) not in want]
            lack = [f"{c} {t}" for c, t in want if (c, t) not in got]
            problems.append(f"{rel.name}: " + "; ".join(p for p in (f"undeclared {extra}" if extra else "",
                                                                    f"lacks {lack}" if lack else "",
                                                                    "" if extra or lack else "column order")
                                                        if p))
    return problems


def applies(ctx: RunData) -> bool:
    return True


def check(ctx: RunData) -> list[Check]:
    return check_connection(ctx.con)


def check_connection(con) -> list[Check]:
    """The one check: the relations of the database behind `con` (read-only) against the declaration."""
    rows = con.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                           "WHERE table_catalog = current_database() AND table_schema = current_schema() "
                           "ORDER BY table_name, ordinal_position").fetchall()
    columns: dict[str, list[tuple[str, str]]] = {}
    for table, col, typ in rows:
        columns.setdefault(table, []).append((col, typ))
    problems = column_problems(columns)
    return [("relations, columns and types as declared (knnlm_core/schema.py)", not problems,
             f"{len(problems)} differ{f': {problems[:3]}' if problems else ''} over {len(schema.RELATIONS)} relations")]
