"""The SQL the journal's named queries are written in (SQLite's), as PostgreSQL takes it.

Every named query in fep.journal is written once. On PostgreSQL each statement passes through `to_postgres`
first: placeholders `?` become `%s`, an `INDEXED BY` hint goes (PostgreSQL's planner picks the index itself),
`BEGIN IMMEDIATE` is a plain BEGIN (writes take row locks), `INSERT OR REPLACE` is an upsert on the table's
key, and an INSERT into a table numbered by `id` returns that id (SQLite's lastrowid). PRAGMAs have no
PostgreSQL meaning: their equivalents are set once per connection (fep.journal_pg). Translations are cached:
the journal asks the same few dozen statements over and over.
"""

from __future__ import annotations

import re
from functools import lru_cache

# Tables whose rows are numbered by an `id` column: an INSERT into one returns it.
NUMBERED = frozenset({"trades", "events", "runs", "audit", "clearing_events"})
# INSERT OR REPLACE targets: (key columns, the other columns in table order).
KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {"meta": (("key",), ("value",))}

_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+", re.IGNORECASE)
_INSERT = re.compile(r"^\s*INSERT\s+(OR\s+(REPLACE|IGNORE)\s+)?INTO\s+(\w+)", re.IGNORECASE)


class Untranslatable(ValueError):
    """A statement the journal's PostgreSQL dialect has no translation for: a programming error, named."""


@lru_cache(maxsize=512)
def to_postgres(sql: str) -> str | None:
    """The statement as PostgreSQL takes it; None: a statement with no PostgreSQL meaning (a PRAGMA)."""
    head = sql.lstrip()[:16].upper()
    if head.startswith("PRAGMA"):
        return None
    if head.startswith("BEGIN"):
        return "BEGIN"
    if "?" in sql and "%" in sql:
        sql = sql.replace("%", "%%")  # a literal % stays one once psycopg fills the placeholders
    sql = _INDEXED_BY.sub("", sql).replace("?", "%s")
    insert = _INSERT.match(sql)
    if insert is None:
        return sql
    table = insert.group(3)
    if insert.group(2):
        sql = _INSERT.sub(f"INSERT INTO {table}", sql, count=1) + _on_conflict(table, insert.group(2).upper())
    if table in NUMBERED and "RETURNING" not in sql.upper():
        sql += " RETURNING id"
    return sql


def _on_conflict(table: str, verb: str) -> str:
    if verb == "IGNORE":
        return " ON CONFLICT DO NOTHING"
    if table not in KEYS:
        raise Untranslatable(f"INSERT OR REPLACE INTO {table}: its key is not in fep.dialect.KEYS")
    key, rest = KEYS[table]
    sets = ", ".join(f"{c} = excluded.{c}" for c in rest)
    return f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
