"""Event -> workflow routing rules, evaluated on the leader (never in the state machine).

Owns what a rule means: an event matches a rule when its type matches the rule's glob
(``fnmatch``, as ``GET /v1/events?type=``), its offset is after the rule's
``start_after``, and the rule's optional JMESPath ``condition`` is truthy (JMESPath
truthiness: null, false, "", [] and {} are false; everything else, 0 included, is
true) when evaluated over the event ``{offset, id, type, key, payload, ts}``. The run's
args are the rule's literal ``args`` updated with ``args_from``: argument name ->
JMESPath expression over the same event (``"@"`` passes the whole event).

An expression that fails at evaluation time (a function applied to the wrong type, or
an ordering comparison of a string with a number) makes the rule not match that event;
the leader counts and logs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import jmespath
import jmespath.exceptions
from jmespath.parser import ParsedResult

log = logging.getLogger("flexcore.windmill")


class ExpressionError(ValueError):
    """A JMESPath expression does not compile; the message says where."""


def compile_expression(expr: str, what: str) -> ParsedResult:
    try:
        return jmespath.compile(expr)
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(f"{what} is not a valid JMESPath expression: "
                              f"{str(exc).splitlines()[0][:200]}") from None


def truthy(value: Any) -> bool:
    """JMESPath's notion of true (0 is true; empty containers and strings are false)."""
    return not (value is None or value is False or value == "" or value == []
                or value == {})


@dataclass(frozen=True)
class CompiledRoute:
    id: str
    version: int
    event_type: str
    start_after: int
    path: str
    kind: str
    args: dict[str, Any]
    condition: ParsedResult | None
    args_from: tuple[tuple[str, ParsedResult], ...]

    @classmethod
    def from_view(cls, view: dict[str, Any]) -> CompiledRoute:
        cond = view.get("condition")
        return cls(view["id"], view["version"], view["event_type"], view["start_after"],
                   view["path"], view["kind"], dict(view.get("args") or {}),
                   compile_expression(cond, "condition") if cond else None,
                   tuple((name, compile_expression(expr, f"args_from.{name}"))
                         for name, expr in (view.get("args_from") or {}).items()))

    def matches(self, event: dict[str, Any]) -> bool:
        """Raises ``jmespath`` errors from the condition (the caller decides)."""
        if event["offset"] <= self.start_after or not fnmatchcase(event["type"],
                                                                  self.event_type):
            return False
        return self.condition is None or truthy(self.condition.search(event))

    def render_args(self, event: dict[str, Any]) -> dict[str, Any]:
        args = dict(self.args)
        for name, expr in self.args_from:
            args[name] = expr.search(event)
        return args


class RouteCache:
    """Compiled rules, recompiled only when a rule's version changes."""

    def __init__(self) -> None:
        self._compiled: dict[str, CompiledRoute] = {}
        self.errors = 0

    def compile(self, views: list[dict[str, Any]]) -> list[CompiledRoute]:
        out: list[CompiledRoute] = []
        seen: set[str] = set()
        for view in views:
            seen.add(view["id"])
            if not view["enabled"]:
                continue
            cached = self._compiled.get(view["id"])
            if cached is None or cached.version != view["version"]:
                try:
                    cached = CompiledRoute.from_view(view)
                except ExpressionError as exc:
                    log.warning("routing rule %s is skipped: %s", view["id"], exc)
                    continue
                self._compiled[view["id"]] = cached
            out.append(cached)
        for gone in set(self._compiled) - seen:
            del self._compiled[gone]
        return out

    def plan(self, routes: list[CompiledRoute],
             event: dict[str, Any]) -> list[tuple[CompiledRoute, dict[str, Any]]]:
        """The (rule, args) pairs this event starts."""
        out: list[tuple[CompiledRoute, dict[str, Any]]] = []
        for route in routes:
            try:
                if route.matches(event):
                    out.append((route, route.render_args(event)))
            except Exception as exc:  # JMESPathError, or jmespath's own TypeError on
                self.errors += 1      # comparing mixed types: the rule does not match
                log.warning("routing rule %s: evaluating event %s failed (%s); no run "
                            "started", route.id, event["offset"], exc)
        return out
