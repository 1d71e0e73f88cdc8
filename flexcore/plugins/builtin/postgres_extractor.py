"""``postgres-extractor``: incremental extraction from any SQLAlchemy database.

Config: ``{url, table, cursor_column, columns?, batch_size?}``.

- ``url``: a SQLAlchemy URL. SQLite is the embedded default that needs no server
  (``sqlite:////var/lib/data/source.db``); PostgreSQL with ``postgresql+psycopg://user
  :password@host/db`` (psycopg 3 is a FlexCore dependency); any other dialect whose
  driver is installed.
- ``table``: ``name`` or ``schema.name``; ``cursor_column``: a column whose values
  only grow as rows are added (an id, a sequence, an insertion timestamp); ``columns``:
  the columns to read (default all); ``batch_size``: rows per batch (1-10,000,
  default 1,000).

Identifiers are checked (letters, digits, ``_`` and ``$``), the table is reflected
(an unknown table or column is a ``bad_config`` error at ``init``), and the query is
built with SQLAlchemy constructs: ``SELECT <columns> FROM <table> WHERE <cursor> >
:checkpoint ORDER BY <cursor> LIMIT :batch_size`` with bound parameters and quoted
identifiers, never string-formatted SQL. Each ``execute`` returns one batch; the
pipeline asks again with the new cursor until ``done``, so a table of any size is
read in full (no silent cut). Rows that share the batch's last cursor value are all
included in that batch (the batch may then exceed ``batch_size``), so a cursor column
with duplicate values never loses a row at a batch boundary.

Values become plain msgpack: dates and times as ISO 8601 strings, decimals and UUIDs
as strings, other unknown types as ``str()``.
"""

from __future__ import annotations

import datetime
import decimal
import re
import uuid
from typing import Any

import sqlalchemy as sa

from flexcore.plugins.sdk import Plugin, PluginError, check_config_fields, serve

NAME = "postgres-extractor"
VERSION = "1.0.0"
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
MAX_BATCH = 10_000
TIE_FACTOR = 10      # at most batch_size * TIE_FACTOR rows may share one cursor value

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["url", "table", "cursor_column"],
    "properties": {
        "url": {"type": "string"},
        "table": {"type": "string"},
        "cursor_column": {"type": "string"},
        "columns": {"type": "array", "items": {"type": "string"}},
        "batch_size": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH},
    },
}


def identifier(value: Any, what: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise PluginError("bad_config", f"{what} must be an identifier (letters, digits, _ "
                                        "and $, starting with a letter or _, at most 63)")
    return value


def plain(value: Any) -> Any:
    """A database value as plain msgpack data."""
    if value is None or isinstance(value, bool | float | str | bytes):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


class Extractor(Plugin):
    def __init__(self) -> None:
        self.engine: sa.Engine | None = None
        self.table: sa.Table | None = None
        self.cursor: sa.Column[Any] | None = None
        self.selected: list[sa.Column[Any]] = []
        self.batch_size = 1000

    def info(self) -> dict[str, Any]:
        return {"name": NAME, "version": VERSION, "kind": "extractor",
                "config_schema": CONFIG_SCHEMA}

    def init(self, config: dict[str, Any]) -> None:
        check_config_fields(config, CONFIG_SCHEMA["properties"])
        url = config.get("url")
        if not isinstance(url, str) or not url:
            raise PluginError("bad_config", "url must be a SQLAlchemy URL "
                                            "(e.g. sqlite:////path/source.db)")
        raw_table = config.get("table")
        if not isinstance(raw_table, str):
            raise PluginError("bad_config", "table must be a string: name or schema.name")
        schema, _, name = raw_table.rpartition(".")
        identifier(name, "table")
        if schema:
            identifier(schema, "table's schema")
        cursor_name = identifier(config.get("cursor_column"), "cursor_column")
        columns = config.get("columns")
        if columns is not None and (not isinstance(columns, list) or not columns):
            raise PluginError("bad_config", "columns must be a non-empty list of names")
        names = [identifier(c, "each of columns") for c in columns or []]
        size = config.get("batch_size", 1000)
        if type(size) is not int or not 1 <= size <= MAX_BATCH:
            raise PluginError("bad_config", f"batch_size must be an integer from 1 to "
                                            f"{MAX_BATCH}")
        try:
            engine = sa.create_engine(url, pool_pre_ping=True)
        except Exception as exc:
            raise PluginError("bad_config", f"cannot use url: {type(exc).__name__}: "
                                            f"{str(exc)[:300]}") from None
        try:
            table = sa.Table(name, sa.MetaData(), schema=schema or None,
                             autoload_with=engine)
        except sa.exc.NoSuchTableError:
            engine.dispose()
            raise PluginError("bad_config", f"no table {raw_table!r} in the database") \
                from None
        except sa.exc.SQLAlchemyError as exc:
            engine.dispose()
            raise PluginError("retryable", f"cannot read the table definition: "
                                           f"{type(exc).__name__}: {str(exc)[:300]}") from None
        missing = [c for c in [cursor_name, *names] if c not in table.c]
        if missing:
            engine.dispose()
            raise PluginError("bad_config", f"table {raw_table!r} has no column(s) "
                                            f"{', '.join(missing)}")
        if self.engine is not None:
            self.engine.dispose()
        self.engine, self.table, self.batch_size = engine, table, size
        self.cursor = table.c[cursor_name]
        self.selected = [table.c[c] for c in names] if names else list(table.c)
        if self.cursor not in self.selected:
            self.selected.append(self.cursor)

    def _checkpoint_value(self, checkpoint: Any) -> Any:
        """The stored (plain) cursor as the column's Python type."""
        assert self.cursor is not None
        if not isinstance(checkpoint, str):
            return checkpoint
        try:
            kind = self.cursor.type.python_type
        except NotImplementedError:
            return checkpoint
        try:
            if kind is datetime.datetime:
                return datetime.datetime.fromisoformat(checkpoint)
            if kind is datetime.date:
                return datetime.date.fromisoformat(checkpoint)
            if kind is decimal.Decimal:
                return decimal.Decimal(checkpoint)
            if kind is int:
                return int(checkpoint)
        except ValueError:
            raise PluginError("bad_request", "the checkpoint does not fit the cursor "
                                             "column's type") from None
        return checkpoint

    def execute(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.engine is None or self.cursor is None:
            raise PluginError("not_initialized", "call init first")
        checkpoint = params.get("checkpoint")
        limit = params.get("limit", self.batch_size)
        if type(limit) is not int or not 1 <= limit <= MAX_BATCH:
            raise PluginError("bad_request", f"limit must be an integer from 1 to {MAX_BATCH}")
        stmt = sa.select(*self.selected).order_by(self.cursor).limit(limit)
        if checkpoint is not None:
            stmt = stmt.where(self.cursor > self._checkpoint_value(checkpoint))
        key = self.cursor.key
        try:
            with self.engine.connect() as conn:
                rows = [dict(r) for r in conn.execute(stmt).mappings()]
                done = len(rows) < limit
                if not done:
                    # Take every row that shares the last cursor value, so the next batch
                    # (cursor > last) cannot skip one.
                    last = rows[-1][key]
                    ties = [dict(r) for r in conn.execute(
                        sa.select(*self.selected).where(self.cursor == last)
                        .limit(limit * TIE_FACTOR + 1)).mappings()]
                    if len(ties) > limit * TIE_FACTOR:
                        raise PluginError("failed", f"more than {limit * TIE_FACTOR} rows "
                                                    f"share one value of {key}: use a "
                                                    "cursor column with (nearly) unique "
                                                    "values")
                    rows = [r for r in rows if r[key] != last] + ties
        except sa.exc.SQLAlchemyError as exc:
            raise PluginError("retryable", f"query failed: {type(exc).__name__}: "
                                           f"{str(exc).splitlines()[0][:300]}") from None
        out = [{k: plain(v) for k, v in row.items()} for row in rows]
        return {"rows": out, "cursor": out[-1][key] if out else checkpoint, "done": done}

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None


if __name__ == "__main__":
    serve(Extractor())
