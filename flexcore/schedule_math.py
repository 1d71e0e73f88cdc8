"""Trigger parsing, next-fire maths and misfire policies, as pure functions.

This module owns what a schedule's trigger *means*: which instants it fires at. The
state machine stores triggers as validated plain data and never computes with clocks
or time zones; the API validates triggers here, and the timer runner (``flexcore.timers``)
asks here which fires are due and when the next one is. Every function takes the
current time as an argument (integer milliseconds since the epoch, UTC) and reads no
clock, so the tests drive it with fixed datetimes.

Trigger forms (the API's, see ``parse_trigger``):

- ``{"interval_s": x}``: every ``x`` seconds (0.05 <= x <= 1 year), at
  ``anchor + k * x`` for k >= 1, where ``anchor`` is when the schedule was created (or
  its trigger last changed), as recorded by the state machine. Every owner therefore
  computes the same fire times.
- ``{"cron": "expr", "timezone"?: "Area/City"}``: a crontab expression of 5 fields
  (``min hour dom month dow``) or 6 (``sec min hour dom month dow``), evaluated on the
  wall clock of ``timezone`` (an IANA name, default ``UTC``). Day-of-week numbers are
  crontab's (0 or 7 = Sunday); names ``sun``..``sat`` work too. Field syntax is
  APScheduler 3's (``*``, ``*/n``, ``a-b``, ``a-b/n``, lists); when both day-of-month
  and day-of-week are restricted a day must match both.
  **Daylight saving**: each wall-clock time the zone shows fires once. A wall time that
  occurs twice (autumn, clocks go back) fires at its first occurrence only; a wall time
  that does not exist (spring, clocks go forward) fires once, at the instant of the
  change. (APScheduler 3.11's own cron maths can step backwards in time around the
  autumn change, so it is used here only on a DST-free wall calendar; the mapping from
  wall time to instant is done below with ``zoneinfo``.)
- ``{"at": "2030-01-01T09:00:00+01:00"}``: once, at an ISO-8601 instant with an offset
  (``Z`` allowed).

Misfire policies (``plan_fires``): a fire is *due* once its time has passed and it has
not been claimed. Due fires older than ``misfire_grace_s`` are never run. Of the rest:
``skip`` runs only a fire that is on time (at most ``ON_TIME_S`` late, i.e. the normal
case); ``run_once`` runs the newest due fire once for the whole backlog; ``run_all``
runs every due fire, oldest first, at most ``MAX_CATCHUP`` of them (the newest).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

MISFIRE_POLICIES = ("skip", "run_once", "run_all")
Misfire = Literal["skip", "run_once", "run_all"]
DEFAULT_MISFIRE: Misfire = "run_once"
DEFAULT_MISFIRE_GRACE_S = 60.0
MAX_MISFIRE_GRACE_S = 7 * 86400.0
ON_TIME_S = 1.0
MAX_CATCHUP = 100
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 366 * 86400.0
MAX_CRON_CHARS = 256
MAX_TZ_CHARS = 64
_MAX_SCAN = 200_000          # bound on cron candidates examined by one call
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MS = 253402300799999    # 9999-12-31T23:59:59.999Z

_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DOW_ITEM = re.compile(r"^(\*|[a-z]{3}|\d{1,2})(?:-([a-z]{3}|\d{1,2}))?(?:/(\d{1,2}))?$")


class TriggerError(ValueError):
    """A trigger is malformed; ``str(exc)`` says which field and why."""


@dataclass(frozen=True, slots=True)
class IntervalSpec:
    interval_ms: int


@dataclass(frozen=True, slots=True)
class CronSpec:
    cron: str
    timezone: str


@dataclass(frozen=True, slots=True)
class DateSpec:
    at_ms: int


TriggerSpec = IntervalSpec | CronSpec | DateSpec


# --- conversions --------------------------------------------------------------------------

def to_ms(dt: datetime) -> int:
    """An aware datetime as integer milliseconds since the epoch (rounded down)."""
    delta = dt.astimezone(UTC) - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


def from_ms(ms: int) -> datetime:
    """Integer milliseconds since the epoch as an aware UTC datetime."""
    return _EPOCH + timedelta(milliseconds=ms)


def iso(ms: int) -> str:
    """``2024-03-31T01:30:00.000Z``: the form the API and fire events carry."""
    return from_ms(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


# --- parsing and validation ------------------------------------------------------------------

def parse_trigger(obj: Any) -> TriggerSpec:
    """The API's trigger object → a validated spec; `TriggerError` names what is wrong."""
    if not isinstance(obj, dict):
        raise TriggerError("trigger must be an object: {interval_s}, {cron, timezone?} or {at}")
    forms = [k for k in ("interval_s", "cron", "at") if k in obj]
    if len(forms) != 1:
        raise TriggerError("trigger must have exactly one of interval_s, cron, at")
    form = forms[0]
    allowed = {"cron", "timezone"} if form == "cron" else {form}
    unknown = sorted(str(k)[:64] for k in obj if k not in allowed)
    if unknown:
        raise TriggerError(f"trigger has unknown field(s) for a {form} trigger: "
                           f"{', '.join(unknown)}")
    if form == "interval_s":
        value = obj["interval_s"]
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S):
            raise TriggerError(f"trigger.interval_s must be a number of seconds from "
                               f"{MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:.0f}")
        return IntervalSpec(round(value * 1000))
    if form == "at":
        return DateSpec(parse_instant(obj["at"], "trigger.at"))
    expr, tz = obj["cron"], obj.get("timezone", "UTC")
    if not isinstance(expr, str) or not expr.strip() or len(expr) > MAX_CRON_CHARS:
        raise TriggerError(f"trigger.cron must be a non-empty string of at most "
                           f"{MAX_CRON_CHARS} characters")
    if tz is None:
        tz = "UTC"
    spec = CronSpec(" ".join(expr.split()), tz)
    check_cron(spec)
    return spec


def parse_instant(value: Any, where: str) -> int:
    """An ISO-8601 string with a UTC offset (or ``Z``) → epoch milliseconds."""
    if not isinstance(value, str) or len(value) > 64:
        raise TriggerError(f"{where} must be an ISO-8601 date-time string with an offset, "
                           "e.g. 2030-01-01T09:00:00+01:00")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise TriggerError(f"{where} is not an ISO-8601 date-time "
                           "(e.g. 2030-01-01T09:00:00+01:00)") from None
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise TriggerError(f"{where} needs a UTC offset or Z (a bare local time is ambiguous)")
    ms = to_ms(dt)
    if not 0 <= ms <= _MAX_MS:
        raise TriggerError(f"{where} must be between 1970 and 9999")
    return ms


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; `TriggerError` if it is unknown."""
    if not isinstance(name, str) or not name or len(name) > MAX_TZ_CHARS:
        raise TriggerError(f"trigger.timezone must be an IANA zone name of at most "
                           f"{MAX_TZ_CHARS} characters, e.g. Europe/Berlin")
    try:
        return _zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise TriggerError(f"trigger.timezone {name[:64]!r} is not a known IANA time zone "
                           "(e.g. UTC, Europe/Berlin, America/New_York)") from None


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _dow_number(token: str) -> int:
    if token.isdigit():
        n = int(token)
        if not 0 <= n <= 7:
            raise TriggerError(f"cron day-of-week {token} is out of range 0-7")
        return n % 7
    if token in _DOW_NAMES:
        return _DOW_NAMES.index(token)
    raise TriggerError(f"cron day-of-week {token[:8]!r} is not a day (0-7 or sun..sat)")


def _crontab_dow(field: str) -> str:
    """A crontab day-of-week field (0/7 = Sunday) as APScheduler 3 names (0 = Monday
    there, so numbers cannot be passed through)."""
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for item in field.lower().split(","):
        m = _DOW_ITEM.match(item)
        if m is None:
            raise TriggerError(f"cron day-of-week item {item[:16]!r} is not "
                               "n, a-b, */n or a-b/n with days 0-7 or sun..sat")
        first, last, step = m.group(1), m.group(2), m.group(3)
        if first == "*":
            if last is not None:
                raise TriggerError("cron day-of-week '*-x' is not valid")
            lo, hi = 0, 6
        else:
            lo = _dow_number(first)
            hi = lo if last is None else _dow_number(last)
            if last is not None and last.isdigit() and int(last) == 7:
                hi = 7
            if hi < lo:
                raise TriggerError(f"cron day-of-week range {item[:16]!r} runs backwards")
        n = int(step) if step else 1
        if n < 1:
            raise TriggerError("cron day-of-week step must be at least 1")
        if step is None and last is None and first != "*":
            days.add(lo)
        else:
            days.update(d % 7 for d in range(lo, hi + 1, n))
    if len(days) == 7:
        return "*"
    return ",".join(_DOW_NAMES[d] for d in sorted(days))


@lru_cache(maxsize=1024)
def _wall_trigger(expr: str) -> CronTrigger:
    """APScheduler's cron on a DST-free wall calendar (naive wall times shown as UTC)."""
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise TriggerError(f"trigger.cron must have 5 fields (min hour dom month dow) or 6 "
                           f"(sec min hour dom month dow), got {len(fields)}")
    second, minute, hour, day, month, dow = fields
    try:
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_crontab_dow(dow), timezone=UTC)
    except TriggerError:
        raise
    except (ValueError, TypeError) as exc:
        raise TriggerError(f"trigger.cron is invalid: {str(exc)[:200]}") from None


def check_cron(spec: CronSpec) -> None:
    """Raise `TriggerError` unless the expression parses, the zone exists and the
    expression fires at least once in the 8 years after 2024 (rejects ``30 2 30 2 *``)."""
    zone(spec.timezone)
    trig = _wall_trigger(spec.cron)
    probe = datetime(2024, 1, 1, tzinfo=UTC)
    nxt = trig.get_next_fire_time(None, probe)
    if nxt is None or nxt > probe + timedelta(days=8 * 366):
        raise TriggerError("trigger.cron never fires (no matching date)")


def trigger_to_api(spec: TriggerSpec) -> dict[str, Any]:
    """The API form of a spec (inverse of `parse_trigger`)."""
    if isinstance(spec, IntervalSpec):
        return {"interval_s": spec.interval_ms / 1000}
    if isinstance(spec, CronSpec):
        return {"cron": spec.cron, "timezone": spec.timezone}
    return {"at": iso(spec.at_ms)}


def trigger_to_state(spec: TriggerSpec) -> dict[str, Any]:
    """The plain form the state machine stores."""
    if isinstance(spec, IntervalSpec):
        return {"interval_ms": spec.interval_ms}
    if isinstance(spec, CronSpec):
        return {"cron": spec.cron, "timezone": spec.timezone}
    return {"at_ms": spec.at_ms}


def trigger_from_state(obj: dict[str, Any]) -> TriggerSpec:
    """Inverse of `trigger_to_state` (the state machine checked the shape)."""
    if "interval_ms" in obj:
        return IntervalSpec(int(obj["interval_ms"]))
    if "at_ms" in obj:
        return DateSpec(int(obj["at_ms"]))
    return CronSpec(str(obj["cron"]), str(obj.get("timezone") or "UTC"))


# --- next-fire maths -------------------------------------------------------------------------

def next_fire_after(spec: TriggerSpec, anchor_ms: int, after_ms: int) -> int | None:
    """The first fire time strictly after ``after_ms`` (None: the trigger is done).

    ``anchor_ms`` is when the schedule's trigger was set: intervals count from it, and
    no trigger fires at or before it.
    """
    after_ms = max(after_ms, anchor_ms)
    if isinstance(spec, IntervalSpec):
        k = (after_ms - anchor_ms) // spec.interval_ms + 1
        return anchor_ms + k * spec.interval_ms
    if isinstance(spec, DateSpec):
        return spec.at_ms if spec.at_ms > after_ms else None
    if after_ms >= _MAX_MS:
        return None
    return _cron_next(spec, after_ms)


def fires_between(spec: TriggerSpec, anchor_ms: int, after_ms: int, until_ms: int,
                  limit: int = MAX_CATCHUP) -> list[int]:
    """The newest ``limit`` fire times in ``(after_ms, until_ms]``, ascending."""
    after_ms = max(after_ms, anchor_ms)
    if until_ms <= after_ms or limit <= 0:
        return []
    if isinstance(spec, IntervalSpec):
        iv = spec.interval_ms
        last_k = (until_ms - anchor_ms) // iv
        first_k = (after_ms - anchor_ms) // iv + 1
        first_k = max(first_k, last_k - limit + 1)
        return [anchor_ms + k * iv for k in range(first_k, last_k + 1)]
    if isinstance(spec, DateSpec):
        return [spec.at_ms] if after_ms < spec.at_ms <= until_ms else []
    # Cron: look back from until_ms in a doubling window, so that a long gap costs
    # O(limit log gap) candidates, not one per second of the gap.
    window = 1000
    while True:
        lo = max(after_ms, until_ms - window)
        found: list[int] = []
        t: int | None = lo
        while True:
            t = next_fire_after(spec, anchor_ms, t) if t is not None else None
            if t is None or t > until_ms:
                break
            found.append(t)
            if len(found) > 4 * limit + _MAX_SCAN // 100:
                found = found[-limit:]
        if lo == after_ms or len(found) >= limit:
            return found[-limit:]
        window *= 2


def latest_fire_at_or_before(spec: TriggerSpec, anchor_ms: int, at_ms: int) -> int | None:
    """The newest fire time in ``(anchor_ms, at_ms]``, or None."""
    found = fires_between(spec, anchor_ms, anchor_ms, at_ms, limit=1)
    return found[-1] if found else None


def _offset_ms(tz: ZoneInfo, ms: int) -> int:
    off = from_ms(ms).astimezone(tz).utcoffset()
    assert off is not None
    return int(off.total_seconds() * 1000)


def _transition_ms(tz: ZoneInfo, lo: int, hi: int) -> int:
    """The first instant in ``(lo, hi]`` with ``hi``'s UTC offset (``lo`` has another);
    zone changes fall on whole seconds."""
    target = _offset_ms(tz, hi)
    lo_s, hi_s = lo // 1000, -(-hi // 1000)
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if _offset_ms(tz, mid * 1000) == target:
            hi_s = mid
        else:
            lo_s = mid
    return hi_s * 1000


def _wall_ms(naive: datetime) -> int:
    return to_ms(naive.replace(tzinfo=UTC))


def _instant_of_wall(tz: ZoneInfo, wall: datetime) -> int:
    """The instant a cron wall time (naive) fires at: its first occurrence when the
    zone shows it twice; the moment of the change when the zone skips it."""
    first = wall.replace(tzinfo=tz, fold=0)
    ms = to_ms(first)
    if from_ms(ms).astimezone(tz).replace(tzinfo=None) == wall:
        return ms
    # A gap: fold=0 read the wall time with the offset before the change, which lands
    # after the change; the change itself lies within one gap length before that.
    gap = _offset_ms(tz, ms) - _offset_ms(tz, ms - 86_400_000)
    return _transition_ms(tz, ms - abs(gap) - 1000, ms)


def _cron_next(spec: CronSpec, after_ms: int) -> int | None:
    tz = zone(spec.timezone)
    trig = _wall_trigger(spec.cron)
    local = from_ms(after_ms).astimezone(tz)
    wall = local.replace(tzinfo=None, fold=0)
    if local.fold == 1:
        # Second pass through a repeated hour: every wall time of it fired in the first
        # pass, so continue from the end of the repeated span.
        off_now = _offset_ms(tz, after_ms)
        shift = int(local.replace(fold=0).utcoffset().total_seconds() * 1000) - off_now  # type: ignore[union-attr]
        change = _transition_ms(tz, after_ms - shift - 1000, after_ms)
        wall = from_ms(change + off_now + shift - 1).replace(tzinfo=None)
    cursor = wall.replace(tzinfo=UTC)
    for _ in range(_MAX_SCAN):
        nxt = trig.get_next_fire_time(None, cursor + timedelta(microseconds=1))
        if nxt is None:
            return None
        nxt = nxt.astimezone(UTC)
        naive = nxt.replace(tzinfo=None)
        if naive.year > 9998:
            return None
        ms = _instant_of_wall(tz, naive)
        if ms > after_ms:
            return ms
        cursor = nxt
    return None


# --- misfire policy ---------------------------------------------------------------------------

def plan_fires(due: list[int], now_ms: int, policy: str, grace_ms: int,
               on_time_ms: int = int(ON_TIME_S * 1000),
               max_catchup: int = MAX_CATCHUP) -> list[int]:
    """Which of the ``due`` fire times (ascending, all <= ``now_ms``, unclaimed) to run.

    Fires more than ``grace_ms`` late are dropped whatever the policy. ``skip``: only a
    fire at most ``min(on_time_ms, grace_ms)`` late (the newest); ``run_once``: the
    newest fire; ``run_all``: all of them, oldest first, the newest ``max_catchup``.
    """
    if policy not in MISFIRE_POLICIES:
        raise ValueError(f"unknown misfire policy {policy!r}")
    live = [f for f in due if 0 <= now_ms - f <= grace_ms]
    if not live:
        return []
    if policy == "skip":
        newest = live[-1]
        return [newest] if now_ms - newest <= min(on_time_ms, grace_ms) else []
    if policy == "run_once":
        return [live[-1]]
    return live[-max_catchup:]


def due_fires(spec: TriggerSpec, anchor_ms: int, last_claimed_ms: int, now_ms: int,
              grace_ms: int, limit: int = MAX_CATCHUP) -> list[int]:
    """Unclaimed fire times in ``(last_claimed_ms, now_ms]`` that are within the grace
    window (older ones can never run), newest ``limit``, ascending."""
    after = max(last_claimed_ms, anchor_ms, now_ms - grace_ms - 1)
    return fires_between(spec, anchor_ms, after, now_ms, limit)


__all__ = [
    "DEFAULT_MISFIRE",
    "DEFAULT_MISFIRE_GRACE_S",
    "MAX_CATCHUP",
    "MAX_MISFIRE_GRACE_S",
    "MISFIRE_POLICIES",
    "ON_TIME_S",
    "CronSpec",
    "DateSpec",
    "IntervalSpec",
    "TriggerError",
    "TriggerSpec",
    "check_cron",
    "due_fires",
    "fires_between",
    "from_ms",
    "iso",
    "latest_fire_at_or_before",
    "next_fire_after",
    "parse_instant",
    "parse_trigger",
    "plan_fires",
    "to_ms",
    "trigger_from_state",
    "trigger_to_api",
    "trigger_to_state",
    "zone",
]
