"""`flexcore.di`: overrides win over factories, handlers get parameters by name or by
type, and a parameter nothing provides is reported with the handler's name."""

from __future__ import annotations

import pytest

from flexcore.di import Clock, Components, FakeClock, InjectionError, plan


class Db:
    pass


class SpecialDb(Db):
    pass


def test_override_wins_and_factory_never_runs() -> None:
    fake = FakeClock(100.0)
    c = Components({Clock: fake})
    assert c.provide(Clock, lambda: pytest.fail("factory ran")) is fake
    fake.advance(2.5)
    assert c.get(Clock)() == 102.5
    built = c.provide(Db, Db)
    assert c.get(Db) is built and not c.overridden(Db)
    with pytest.raises(TypeError):
        Components({Clock: object()})


def test_handler_parameters_by_name_type_and_default() -> None:
    c = Components()
    db = SpecialDb()
    c.set(SpecialDb, db)

    async def handler(event: str, store: Db, attempt: int, other: Clock | None = None,
                      ) -> None: ...

    p = plan(handler)
    assert p.is_async
    p.check(c, frozenset({"event", "attempt"}))
    assert p.kwargs(c, {"event": "e", "attempt": 2}) == {"event": "e", "store": db,
                                                         "attempt": 2}

    def needs_clock(clock: Clock) -> None: ...

    with pytest.raises(InjectionError, match=r"needs_clock.*'clock' \(Clock\)"):
        plan(needs_clock).check(c, frozenset({"event"}))
