"""Queue benchmark: enqueue + lease + ack cycles on a real 3-node cluster, over HTTP.

Run it as ``.venv/bin/python -m bench.queue_bench`` (``--help`` for flags). On one
fresh 3-node `LocalCluster` (default node settings, 127.0.0.1 only):

1. ``--consumers`` workers (default 16), each on node ``w % 3``, loop for ``--seconds``:
   ``POST /v1/queues/bench/messages``, ``POST .../lease`` (max 1, wait_s 1), ``POST
   .../ack`` of what it leased. A cycle is one message through all three; each step
   is its own Raft commit. Reported: cycles/s (= acks/s), enqueue/lease/ack p50 and
   p99 (client-side, ms), and errors. A 1 s warm-up is not measured.
2. Beside it, on the same cluster: single-event ``POST /v1/events`` with the same
   number of clients (``bench.api_bench.run_load``), so the two throughputs compare.

Machine facts, percentiles, cluster handling and the results folder are those of
``bench.api_bench``. The Markdown report is printed and written to
``bench/results/queue-<UTC timestamp>.md``; ``--json`` prints JSON instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import aiohttp

from bench.api_bench import (
    REQUEST_TIMEOUT_S,
    RESULTS_DIR,
    WARMUP_S,
    BenchCluster,
    _on_sigterm,
    _proc_cpu_s,
    _self_cpu_s,
    log,
    machine_facts,
    percentile,
    run_load,
    single_event_body,
)
from flexcore.cluster import LocalCluster

QUEUE = "bench"


async def _cycles(urls: Sequence[str], workers: int, seconds: float) -> dict[str, Any]:
    lat: dict[str, list[float]] = {"enqueue": [], "lease": [], "ack": []}
    errors: Counter[str] = Counter()
    cycles = 0
    measuring = False
    connector = aiohttp.TCPConnector(limit=workers + 4, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async def call(step: str, url: str, body: dict[str, Any], ok: int) -> Any:
            t0 = time.perf_counter()
            try:
                async with http.post(url, data=json.dumps(body), headers=headers) as resp:
                    payload = await resp.json()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[f"{step} {type(exc).__name__}"] += 1
                await asyncio.sleep(0.01)
                return None
            if status != ok:
                errors[f"{step} HTTP {status}"] += 1
                return None
            if measuring:
                lat[step].append(time.perf_counter() - t0)
            return payload

        async def worker(w: int, end: float) -> None:
            nonlocal cycles
            base = f"{urls[w % len(urls)]}/v1/queues/{QUEUE}"
            i = 0
            while time.perf_counter() < end:
                i += 1
                await call("enqueue", base + "/messages", {"body": {"w": w, "i": i}}, 201)
                got = await call("lease", base + "/lease",
                                 {"consumer": f"w{w}", "max": 1, "wait_s": 1}, 200)
                for m in (got or {}).get("messages", []):
                    if await call("ack", base + "/ack", {"lease_id": m["lease_id"]}, 200) \
                            is not None and measuring:
                        cycles += 1

        end = time.perf_counter() + WARMUP_S
        await asyncio.gather(*(worker(w, end) for w in range(workers)))
        measuring = True
        errors.clear()
        start = time.perf_counter()
        await asyncio.gather(*(worker(w, start + seconds) for w in range(workers)))
        elapsed = time.perf_counter() - start

    def ms(values: list[float], q: float) -> float | None:
        v = percentile(sorted(values), q)
        return None if v is None else round(v * 1000, 3)

    return {"workers": workers, "seconds": round(elapsed, 3), "cycles": cycles,
            "cycles_per_s": round(cycles / elapsed, 1),
            **{f"{step}_{name}_ms": ms(values, q) for step, values in lat.items()
               for name, q in (("p50", 0.5), ("p99", 0.99))},
            "errors": dict(errors)}


def run_cycles(cluster: LocalCluster, workers: int, seconds: float) -> dict[str, Any]:
    urls = [n.url for n in cluster.nodes]
    pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
    log(f"queue cycles: {workers} workers for {seconds:g} s (+{WARMUP_S:g} s warm-up)")
    c0, s0, t0 = _self_cpu_s(), sum(_proc_cpu_s(p) for p in pids), time.perf_counter()
    result = asyncio.run(_cycles(urls, workers, seconds))
    wall = time.perf_counter() - t0
    result["client_cpu_pct"] = round(100 * (_self_cpu_s() - c0) / wall, 1)
    result["server_cpu_pct"] = round(
        100 * (sum(_proc_cpu_s(p) for p in pids) - s0) / wall, 1)
    log(f"  -> {result['cycles_per_s']:g} cycles/s, lease p50 {result['lease_p50_ms']} ms, "
        f"ack p50 {result['ack_p50_ms']} ms, errors {sum(result['errors'].values())}")
    return result


def render_markdown(report: dict[str, Any]) -> str:
    facts, q, ev = report["machine"], report["queue"], report["events"]
    out = [f"# FlexCore queue benchmark, {facts['date_utc']}", "",
           "| machine | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in facts.items()]
    out += ["", f"3-node cluster on loopback, {q['workers']} clients spread over the nodes, "
            f"{q['seconds']:g} s measured after a {WARMUP_S:g} s warm-up.", "",
            "| what | per second | p50 ms | p99 ms | errors | client CPU % | server CPU % |",
            "|---|---|---|---|---|---|---|",
            f"| enqueue + lease + ack cycles | {q['cycles_per_s']:,.1f} | "
            f"lease {q['lease_p50_ms']} / ack {q['ack_p50_ms']} / enqueue "
            f"{q['enqueue_p50_ms']} | lease {q['lease_p99_ms']} / ack {q['ack_p99_ms']} / "
            f"enqueue {q['enqueue_p99_ms']} | {sum(q['errors'].values())} | "
            f"{q['client_cpu_pct']} | {q['server_cpu_pct']} |",
            f"| single-event POST /v1/events | {ev['ops_per_s']:,.1f} | {ev['p50_ms']} | "
            f"{ev['p99_ms']} | {ev['errors']} | {ev['client_cpu_pct']} | "
            f"{ev['server_cpu_pct']} |", "",
            "A cycle is three Raft commits (enqueue, lease, ack), so cycles/s x 3 is the "
            "queue's commit rate to compare with events/s."]
    if q["errors"]:
        out += ["", "Errors: " + ", ".join(f"{k}: {v}" for k, v in q["errors"].items())]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_bench",
                                     description="Queue cycles on a local 3-node cluster.")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--consumers", type=int, default=16, help="concurrent clients")
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    args = parser.parse_args(argv)
    if not 0.5 <= args.seconds <= 600 or not 1 <= args.consumers <= 256:
        print("--seconds must be 0.5-600 and --consumers 1-256", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report: dict[str, Any] = {"machine": machine_facts()}
    try:
        with BenchCluster("queues", []) as cluster:
            report["queue"] = run_cycles(cluster, args.consumers, args.seconds)
            report["events"] = asdict(run_load(
                f"POST /v1/events x{args.consumers}", cluster, clients=args.consumers,
                seconds=args.seconds, path="/v1/events", body=single_event_body))
    except KeyboardInterrupt:
        log("interrupted; every node was stopped")
        return 130
    except TimeoutError as exc:
        log(f"cluster did not come up: {exc}")
        return 1
    markdown = render_markdown(report)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"queue-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.md"
    path.write_text(markdown + "\n")
    print(json.dumps(report, indent=2) if args.json else markdown)
    log(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
