"""Next-fire maths and misfire policies as pure functions on fixed datetimes."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from flexcore.schedule_math import (
    CronSpec,
    DateSpec,
    IntervalSpec,
    TriggerError,
    due_fires,
    fires_between,
    from_ms,
    iso,
    latest_fire_at_or_before,
    next_fire_after,
    parse_trigger,
    plan_fires,
    to_ms,
    trigger_to_api,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
        second: int = 0) -> int:
    return to_ms(datetime(year, month, day, hour, minute, second, tzinfo=UTC))


def local(ms: int, tz: ZoneInfo) -> str:
    return from_ms(ms).astimezone(tz).isoformat()


def walk(spec: CronSpec | IntervalSpec | DateSpec, start: int, n: int,
         anchor: int = 0) -> list[int]:
    out: list[int] = []
    t: int | None = start
    for _ in range(n):
        assert t is not None
        t = next_fire_after(spec, anchor, t)
        if t is None:
            break
        out.append(t)
    return out


# --- parsing ------------------------------------------------------------------------------

def test_parse_forms_and_round_trip() -> None:
    assert parse_trigger({"interval_s": 1.5}) == IntervalSpec(1500)
    assert parse_trigger({"cron": " */5  * * * * * "}) == CronSpec("*/5 * * * * *", "UTC")
    spec = parse_trigger({"cron": "0 9 * * mon-fri", "timezone": "Europe/Berlin"})
    assert trigger_to_api(spec) == {"cron": "0 9 * * mon-fri", "timezone": "Europe/Berlin"}
    at = parse_trigger({"at": "2030-01-01T09:00:00+01:00"})
    assert at == DateSpec(utc(2030, 1, 1, 8))
    assert trigger_to_api(at) == {"at": "2030-01-01T08:00:00.000Z"}
    assert parse_trigger({"at": "2030-01-01T08:00:00Z"}) == at


@pytest.mark.parametrize(("trigger", "fragment"), [
    ({"cron": "* * *"}, "5 fields"),
    ({"cron": "61 * * * *"}, "61"),
    ({"cron": "* * * * 8"}, "out of range"),
    ({"cron": "* * * * 5-1"}, "backwards"),
    ({"cron": "0 0 30 2 *"}, "never fires"),
    ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "not a known IANA"),
    ({"cron": "* * * * *", "timezone": 5}, "timezone"),
    ({"interval_s": 0}, "interval_s"),
    ({"interval_s": True}, "interval_s"),
    ({"interval_s": 10**9}, "interval_s"),
    ({"at": "2030-01-01T09:00:00"}, "offset"),
    ({"at": "soon"}, "ISO-8601"),
    ({"interval_s": 1, "cron": "* * * * *"}, "exactly one"),
    ({"interval_s": 1, "timezone": "UTC"}, "unknown field"),
    ([], "must be an object"),
])
def test_bad_triggers_say_why(trigger: object, fragment: str) -> None:
    with pytest.raises(TriggerError, match=fragment):
        parse_trigger(trigger)


# --- interval and date --------------------------------------------------------------------------

def test_interval_fires_on_the_anchor_grid() -> None:
    spec = IntervalSpec(1000)
    anchor = utc(2024, 5, 1, 12, 0, 0) + 250
    assert walk(spec, anchor, 3, anchor) == [anchor + 1000, anchor + 2000, anchor + 3000]
    # From any point, the next fire is the next grid point, never the point itself.
    assert next_fire_after(spec, anchor, anchor + 2000) == anchor + 3000
    assert next_fire_after(spec, anchor, anchor + 2001) == anchor + 3000
    # Nothing at or before the anchor.
    assert next_fire_after(spec, anchor, anchor - 10_000) == anchor + 1000
    assert fires_between(spec, anchor, anchor + 500, anchor + 4000, limit=2) == \
        [anchor + 3000, anchor + 4000]
    assert latest_fire_at_or_before(spec, anchor, anchor + 3999) == anchor + 3000


def test_date_fires_once() -> None:
    spec = DateSpec(utc(2030, 1, 1))
    assert next_fire_after(spec, 0, utc(2029, 1, 1)) == utc(2030, 1, 1)
    assert next_fire_after(spec, 0, utc(2030, 1, 1)) is None
    # A date before the schedule was created never fires.
    assert next_fire_after(spec, utc(2031, 1, 1), utc(2029, 1, 1)) is None


# --- cron ----------------------------------------------------------------------------------------

def test_cron_with_seconds_field() -> None:
    spec = parse_trigger({"cron": "*/5 * * * * *"})
    start = utc(2024, 5, 1, 12, 0, 3)
    assert [iso(t) for t in walk(spec, start, 3)] == [
        "2024-05-01T12:00:05.000Z", "2024-05-01T12:00:10.000Z", "2024-05-01T12:00:15.000Z"]


def test_cron_day_of_week_is_crontab_numbering() -> None:
    # 0 and 7 are Sunday (APScheduler 3 alone would read 0 as Monday).
    sunday = parse_trigger({"cron": "0 12 * * 0"})
    assert [datetime.fromtimestamp(t / 1000, UTC).strftime("%a %d") for t in
            walk(sunday, utc(2024, 5, 1), 2)] == ["Sun 05", "Sun 12"]
    assert walk(parse_trigger({"cron": "0 12 * * 7"}), utc(2024, 5, 1), 2) == \
        walk(sunday, utc(2024, 5, 1), 2)
    weekdays = parse_trigger({"cron": "0 12 * * 1-5"})
    days = [datetime.fromtimestamp(t / 1000, UTC).strftime("%a") for t in
            walk(weekdays, utc(2024, 5, 3), 5)]   # from Friday 3 May
    assert days == ["Fri", "Mon", "Tue", "Wed", "Thu"]
    odd = parse_trigger({"cron": "0 12 * * */2"})     # crontab: sun, tue, thu, sat
    days = [datetime.fromtimestamp(t / 1000, UTC).strftime("%a") for t in
            walk(odd, utc(2024, 5, 4, 13), 4)]   # after Saturday noon
    assert days == ["Sun", "Tue", "Thu", "Sat"]


def test_cron_in_a_time_zone_follows_its_offset_changes() -> None:
    # 09:00 New York on weekdays: 14:00 UTC before the 10 March 2024 change, 13:00 after.
    spec = parse_trigger({"cron": "0 9 * * 1-5", "timezone": "America/New_York"})
    fires = walk(spec, utc(2024, 3, 7), 4)
    assert [iso(t) for t in fires] == ["2024-03-07T14:00:00.000Z", "2024-03-08T14:00:00.000Z",
                                       "2024-03-11T13:00:00.000Z", "2024-03-12T13:00:00.000Z"]
    assert all(local(t, NEW_YORK).endswith(("09:00:00-05:00", "09:00:00-04:00"))
               for t in fires)


def test_dst_spring_forward_skipped_wall_time_fires_once_at_the_change() -> None:
    # Europe/Berlin, 31 March 2024: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    daily = parse_trigger({"cron": "30 2 * * *", "timezone": "Europe/Berlin"})
    fires = walk(daily, utc(2024, 3, 29), 4)
    assert [local(t, BERLIN) for t in fires] == [
        "2024-03-29T02:30:00+01:00", "2024-03-30T02:30:00+01:00",
        "2024-03-31T03:00:00+02:00",          # the skipped 02:30 fires at the change
        "2024-04-01T02:30:00+02:00"]
    half_hourly = parse_trigger({"cron": "*/30 * * * *", "timezone": "Europe/Berlin"})
    fires = walk(half_hourly, utc(2024, 3, 31, 0, 0), 4)
    assert [local(t, BERLIN) for t in fires] == [
        "2024-03-31T01:30:00+01:00", "2024-03-31T03:00:00+02:00",
        "2024-03-31T03:30:00+02:00", "2024-03-31T04:00:00+02:00"]


def test_dst_fall_back_repeated_wall_time_fires_once() -> None:
    # Europe/Berlin, 27 October 2024: 03:00 CEST goes back to 02:00 CET; 02:xx twice.
    daily = parse_trigger({"cron": "30 2 * * *", "timezone": "Europe/Berlin"})
    fires = walk(daily, utc(2024, 10, 26), 3)
    assert [local(t, BERLIN) for t in fires] == [
        "2024-10-26T02:30:00+02:00", "2024-10-27T02:30:00+02:00", "2024-10-28T02:30:00+01:00"]
    half_hourly = parse_trigger({"cron": "*/30 * * * *", "timezone": "Europe/Berlin"})
    fires = walk(half_hourly, utc(2024, 10, 26, 23, 0), 6)
    assert [local(t, BERLIN) for t in fires] == [
        "2024-10-27T01:30:00+02:00", "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:30:00+02:00", "2024-10-27T03:00:00+01:00",
        "2024-10-27T03:30:00+01:00", "2024-10-27T04:00:00+01:00"]
    # Strictly increasing, even when asked from inside the repeated hour.
    inside = utc(2024, 10, 27, 1, 10)                        # 02:10 CET, second pass
    assert local(inside, BERLIN) == "2024-10-27T02:10:00+01:00"
    assert local(next_fire_after(half_hourly, 0, inside) or 0, BERLIN) == \
        "2024-10-27T03:00:00+01:00"
    assert fires == sorted(set(fires))


def test_dst_new_york_fall_back_and_per_second_cron_across_the_change() -> None:
    spec = parse_trigger({"cron": "0 0 1 * * *", "timezone": "America/New_York"})  # 01:00:00
    fires = walk(spec, utc(2024, 11, 2, 12), 2)
    assert [local(t, NEW_YORK) for t in fires] == [
        "2024-11-03T01:00:00-04:00", "2024-11-04T01:00:00-05:00"]
    every_second = parse_trigger({"cron": "* * * * * *", "timezone": "America/New_York"})
    change = utc(2024, 11, 3, 6, 0, 0)           # 02:00 EDT -> 01:00 EST
    around = fires_between(every_second, 0, change - 3000, change + 3000, limit=10)
    # Every wall second of the repeated hour already fired in its first pass, so the
    # seconds right after the change (01:00:00.. EST, again) do not fire a second time:
    # the next fire is 02:00:00 EST. (Use an interval trigger, or a UTC cron, for work
    # that must run every few seconds in absolute time.)
    assert around == [change - 2000, change - 1000]
    assert local(change, NEW_YORK) == "2024-11-03T01:00:00-05:00"
    assert local(change - 1000, NEW_YORK) == "2024-11-03T01:59:59-04:00"
    assert local(next_fire_after(every_second, 0, change - 1000) or 0, NEW_YORK) == \
        "2024-11-03T02:00:00-05:00"


def test_fires_between_cron_takes_the_newest_after_a_long_gap() -> None:
    spec = parse_trigger({"cron": "* * * * * *"})
    until = utc(2024, 5, 2)
    got = fires_between(spec, 0, utc(2024, 5, 1), until, limit=3)
    assert got == [until - 2000, until - 1000, until]


# --- misfire policies (a fake clock: now is an argument) -----------------------------------------

T0 = utc(2024, 5, 1, 12)
GRACE = 60_000


@pytest.mark.parametrize(("policy", "expected"), [
    ("skip", [T0 + 10_000]),
    ("run_once", [T0 + 10_000]),
    ("run_all", [T0 + 10_000]),
])
def test_on_time_fire_runs_under_every_policy(policy: str, expected: list[int]) -> None:
    due = [T0 + 10_000]
    assert plan_fires(due, T0 + 10_005, policy, GRACE) == expected


def test_misfire_policies_after_a_failover() -> None:
    spec = IntervalSpec(1000)
    last_claimed = T0 + 5000
    now = T0 + 9_300                     # the new owner starts 4.3 s after the last claim
    due = due_fires(spec, T0, last_claimed, now, GRACE)
    assert due == [T0 + 6000, T0 + 7000, T0 + 8000, T0 + 9000]
    assert plan_fires(due, now, "skip", GRACE) == [T0 + 9000]       # 300 ms late: on time
    assert plan_fires(due, now + 1000, "skip", GRACE) == []         # 1.3 s late: skipped
    assert plan_fires(due, now, "run_once", GRACE) == [T0 + 9000]
    assert plan_fires(due, now + 1000, "run_once", GRACE) == [T0 + 9000]
    assert plan_fires(due, now, "run_all", GRACE) == due


def test_misfire_grace_drops_old_fires_and_run_all_is_bounded() -> None:
    spec = IntervalSpec(1000)
    now = T0 + 600_000                   # 10 minutes without an owner
    due = due_fires(spec, T0, T0, now, GRACE)
    assert due[0] >= now - GRACE and due[-1] == now and len(due) == 61 - 0
    assert plan_fires(due, now, "run_all", GRACE) == due[-61:]
    assert len(plan_fires(due, now, "run_all", GRACE, max_catchup=10)) == 10
    assert plan_fires(due, now, "run_all", 5_000) == due[-6:]
    assert plan_fires([T0], T0 + 120_000, "run_once", GRACE) == []   # beyond grace: gone
    assert plan_fires([], now, "run_all", GRACE) == []
    with pytest.raises(ValueError):
        plan_fires(due, now, "sometimes", GRACE)


def test_due_fires_never_returns_claimed_or_future_fires() -> None:
    spec = IntervalSpec(1000)
    assert due_fires(spec, T0, T0 + 3000, T0 + 3999, GRACE) == []
    assert due_fires(spec, T0, T0 + 3000, T0 + 4000, GRACE) == [T0 + 4000]
