"""``json-transformer``: reshape and filter rows with JMESPath, declaratively.

Config: ``{mapping?: {out_field: expression}, filter?: expression}`` (at least one).
For each row, ``filter`` (when set) must be truthy in JMESPath's sense (not null,
false, empty string/list/map) or the row is dropped; then the output row is
``{out_field: search(expression, row)}`` for every entry of ``mapping`` (without a
mapping the row passes unchanged). Expressions are compiled at ``init``: a bad one is a
``bad_config`` error naming the field.

Example: ``{"mapping": {"id": "id", "total": "amount", "city": "address.city"},
"filter": "amount > `10`"}``.
"""

from __future__ import annotations

from typing import Any

import jmespath
import jmespath.exceptions
import jmespath.parser

from flexcore.plugins.sdk import Plugin, PluginError, check_config_fields, serve

NAME = "json-transformer"
VERSION = "1.0.0"
MAX_FIELDS = 256
MAX_EXPR = 1000

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"mapping": {"type": "object", "additionalProperties": {"type": "string"}},
                   "filter": {"type": "string"}},
}


def _compile(expr: Any, where: str) -> jmespath.parser.ParsedResult:
    if not isinstance(expr, str) or not 1 <= len(expr) <= MAX_EXPR:
        raise PluginError("bad_config", f"{where} must be a JMESPath expression of 1 to "
                                        f"{MAX_EXPR} characters")
    try:
        return jmespath.compile(expr)
    except jmespath.exceptions.JMESPathError as exc:
        raise PluginError("bad_config", f"{where} is not valid JMESPath: "
                                        f"{str(exc).splitlines()[0][:200]}") from None


def _truthy(value: Any) -> bool:
    return value not in (None, False, "", [], {})


class Mapping:
    """A compiled config: ``apply(rows)`` is the whole transformation."""

    def __init__(self, config: dict[str, Any]) -> None:
        check_config_fields(config, ("mapping", "filter"))
        raw = config.get("mapping")
        if raw is None and config.get("filter") is None:
            raise PluginError("bad_config", "give a mapping, a filter or both")
        if raw is not None and (not isinstance(raw, dict) or not raw
                                or len(raw) > MAX_FIELDS):
            raise PluginError("bad_config", f"mapping must map 1 to {MAX_FIELDS} output "
                                            "fields to JMESPath expressions")
        self.fields = ({str(k): _compile(v, f"mapping.{k}") for k, v in raw.items()}
                       if raw is not None else None)
        flt = config.get("filter")
        self.filter = _compile(flt, "filter") if flt is not None else None

    def apply(self, rows: list[Any]) -> list[Any]:
        out = []
        for row in rows:
            if self.filter is not None and not _truthy(self.filter.search(row)):
                continue
            out.append(row if self.fields is None
                       else {k: e.search(row) for k, e in self.fields.items()})
        return out


class Transformer(Plugin):
    def __init__(self) -> None:
        self.mapping: Mapping | None = None

    def info(self) -> dict[str, Any]:
        return {"name": NAME, "version": VERSION, "kind": "transformer",
                "config_schema": CONFIG_SCHEMA}

    def init(self, config: dict[str, Any]) -> None:
        self.mapping = Mapping(config)

    def execute(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.mapping is None:
            raise PluginError("not_initialized", "call init first")
        rows = params.get("rows")
        if not isinstance(rows, list):
            raise PluginError("bad_request", "execute needs {rows: [...]}")
        return {"rows": self.mapping.apply(rows)}


if __name__ == "__main__":
    serve(Transformer())
