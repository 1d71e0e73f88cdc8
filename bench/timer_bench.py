"""Timer singleton benchmark: fire jitter and failover gaps on a real 3-node cluster.

Run it as ``.venv/bin/python -m bench.timer_bench`` (``--help`` for flags). What it
measures:

1. **Fire jitter**: ``--schedules`` interval schedules (default 10, every 1 s, each
   publishing an event) run in parallel until ``--fires`` fires (default 300) have an
   outcome. Jitter of a fire = the time the owner saw its claim committed minus the
   scheduled fire time (``lag_ms`` in the fire history: both taken from the owner's
   clock, so no clock skew enters). Parallel schedules instead of one fast one: 300
   fires take ~30 s, and each schedule's bounded history (100 fires) holds them all.
   Reported: p50, p99, max; plus the claim's Raft stamp minus the fire time.
2. **Failover gap**: a probe schedule (every ``--probe-interval`` s, default 0.25) runs
   while the leader is killed with SIGKILL ``--kills`` times (default 5; the killed node
   is restarted each time and the cluster settles before the next kill). Per kill:
   the gap between the last claim before the kill and the first after it (claim stamps),
   the time from the kill to that first claim, and the Raft terms the failover used
   (more than one is a split vote: an extra election round).

Everything runs against 127.0.0.1 and ends by time or by observed state. The Markdown
report is printed and written to ``bench/results/<UTC timestamp>-timers.md``;
``--json`` prints the raw results instead. Every node process is stopped on every path.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from bench.api_bench import (
    RESULTS_DIR,
    BenchCluster,
    _on_sigterm,
    log,
    machine_facts,
    percentile,
)
from flexcore.cluster import LocalCluster, http_json, wait_for


def _put(cluster: LocalCluster, sid: str, interval_s: float) -> None:
    code, body = http_json("PUT", f"{cluster.nodes[0].url}/v1/schedules/{sid}", {
        "trigger": {"interval_s": interval_s},
        "action": {"type": "event", "event_type": "bench.fire"}, "misfire": "run_once"})
    if code not in (200, 201):
        raise RuntimeError(f"PUT schedule {sid}: {code} {body}")


def _fires(cluster: LocalCluster, sid: str) -> list[dict[str, Any]]:
    for node in cluster.live():
        try:
            code, body = http_json("GET", f"{node.url}/v1/schedules/{sid}/fires", timeout=5)
        except OSError:
            continue
        if code == 200:
            return list(body["fires"])
    return []


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50": percentile(ordered, 0.5),
            "p99": percentile(ordered, 0.99), "max": ordered[-1] if ordered else None,
            "min": ordered[0] if ordered else None}


def bench_jitter(cluster: LocalCluster, schedules: int, fires: int,
                 timeout: float) -> dict[str, Any]:
    ids = [f"jitter-{i}" for i in range(schedules)]
    for sid in ids:
        _put(cluster, sid, 1.0)
    log(f"{schedules} schedules every 1 s; waiting for {fires} completed fires")
    per = -(-fires // schedules)

    def enough() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = []
        for sid in ids:
            done = [f for f in _fires(cluster, sid) if f["status"] != "claimed"]
            if len(done) < per:
                return None
            rows.extend(done[:per])
        return rows
    rows = wait_for(f"{fires} fires", enough, timeout, interval=1.0)[:fires]
    for sid in ids:
        http_json("POST", f"{cluster.nodes[0].url}/v1/schedules/{sid}/pause")
    lags = [float(f["lag_ms"]) for f in rows if f["lag_ms"] is not None]
    stamps = [float(f["claimed_ts"] - f["fire_time_ms"]) for f in rows]
    return {"schedules": schedules, "fires": len(rows),
            "statuses": {s: sum(1 for f in rows if f["status"] == s)
                         for s in sorted({f["status"] for f in rows})},
            "commit_lag_ms": _stats(lags), "stamp_lag_ms": _stats(stamps)}


def bench_failover(cluster: LocalCluster, kills: int, interval_s: float) -> dict[str, Any]:
    _put(cluster, "probe", interval_s)
    runs: list[dict[str, Any]] = []
    for k in range(1, kills + 1):
        i = cluster.leader_index(timeout=30)
        old = cluster.nodes[i]
        st = cluster.status(i) or {}
        def leader_fired(raft: str = old.raft) -> bool | None:
            return True if any(f["node"] == raft for f in _fires(cluster, "probe")[-3:]) \
                else None
        wait_for("probe fires from the leader", leader_fired, 30)
        t_kill = int(time.time() * 1000)
        cluster.kill(i)
        new = cluster.wait_leader(timeout=30, among=[n.index for n in cluster.nodes
                                                     if n.index != i])

        def first_after(new: str = new, t_kill: int = t_kill) -> dict[str, Any] | None:
            rows = _fires(cluster, "probe")
            return next((f for f in rows if f["node"] == new and f["claimed_ts"] >= t_kill),
                        None)
        first = wait_for("the new leader's first fire", first_after, 30)
        rows = _fires(cluster, "probe")
        before = [f for f in rows if f["claimed_ts"] < t_kill]
        last = before[-1] if before else None
        runs.append({
            "kill": k, "old": old.raft, "old_term": st.get("term"), "new": new,
            "new_term": first["term"],
            "election_rounds": first["term"] - int(st.get("term") or first["term"]),
            "gap_ms": first["claimed_ts"] - last["claimed_ts"] if last else None,
            "kill_to_fire_ms": first["claimed_ts"] - t_kill,
            "caught_up_fire_late_ms": first["claimed_ts"] - first["fire_time_ms"]})
        log(f"kill {k}: gap {runs[-1]['gap_ms']} ms, kill->fire "
            f"{runs[-1]['kill_to_fire_ms']} ms, rounds {runs[-1]['election_rounds']}")
        cluster.start_node(i)

        def back(i: int = i) -> bool | None:
            view = cluster.status(i)
            return True if view and view["leader"] and view["ready"] else None
        wait_for(f"node {i + 1} back", back, 30)
        time.sleep(2.0)   # settle: let the restarted node rejoin before the next kill
    gaps = [float(r["gap_ms"]) for r in runs if r["gap_ms"] is not None]
    return {"kills": kills, "probe_interval_s": interval_s, "runs": runs,
            "gap_ms": _stats(gaps),
            "kill_to_fire_ms": _stats([float(r["kill_to_fire_ms"]) for r in runs])}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = ["# FlexCore timer benchmark", "", "| fact | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in m.items()]
    j = report["jitter"]
    out += ["", f"## Fire jitter: {j['fires']} fires, {j['schedules']} schedules every 1 s "
            "in parallel (3-node cluster)", "",
            "| measure | n | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for key, name in (("commit_lag_ms", "claim committed (owner clock) - fire time"),
                      ("stamp_lag_ms", "claim Raft stamp - fire time")):
        s = j[key]
        out.append(f"| {name} | {s['n']} | {_fmt(s['p50'])} | {_fmt(s['p99'])} | "
                   f"{_fmt(s['max'])} |")
    out.append(f"\nOutcomes: {j['statuses']}")
    f = report["failover"]
    out += ["", f"## Failover gap: {f['kills']} leader kills (SIGKILL), probe schedule every "
            f"{f['probe_interval_s']:g} s", "",
            "| kill | old leader (term) | new leader (term) | election rounds | gap ms | "
            "kill -> first fire ms |", "|---:|---|---|---:|---:|---:|"]
    for r in f["runs"]:
        out.append(f"| {r['kill']} | {r['old']} ({r['old_term']}) | {r['new']} "
                   f"({r['new_term']}) | {r['election_rounds']} | {_fmt(r['gap_ms'])} | "
                   f"{_fmt(r['kill_to_fire_ms'])} |")
    g, k = f["gap_ms"], f["kill_to_fire_ms"]
    out += ["", f"Gap between the last fire before a kill and the first after it: min "
            f"{_fmt(g['min'])}, p50 {_fmt(g['p50'])}, max {_fmt(g['max'])} ms. Kill to first "
            f"fire: min {_fmt(k['min'])}, p50 {_fmt(k['p50'])}, max {_fmt(k['max'])} ms. "
            "The nodes run with the default election timeout (1-2 s)."]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.timer_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedules", type=int, default=10)
    p.add_argument("--fires", type=int, default=300)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--probe-interval", type=float, default=0.25)
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.schedules <= 100 or not 1 <= args.fires <= 100 * args.schedules:
        print("--schedules must be 1-100 and --fires at most 100 per schedule",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    report: dict[str, Any] = {"machine": machine_facts(), "options": vars(args)}
    try:
        with BenchCluster("timers", []) as cluster:
            report["jitter"] = bench_jitter(cluster, args.schedules, args.fires,
                                            timeout=60 + 2.0 * args.fires / args.schedules)
            report["failover"] = bench_failover(cluster, args.kills, args.probe_interval)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    text = render(report)
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-timers.md"
    path.write_text(text)
    log(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
