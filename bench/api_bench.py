"""FlexCore API benchmark: a real 3-node cluster on loopback, driven over HTTP.

Run it as ``.venv/bin/python -m bench.api_bench`` (``--help`` for flags). What it
measures, in this order:

1. In-process ``StateMachine.apply_batch`` throughput (no network, no Raft), before
   any node runs.
2. Single-event ``POST /v1/events`` at each ``--levels`` concurrency, requests spread
   round-robin over the three nodes (followers forward to the leader through Raft),
   then 64 clients sending to the leader only.
3. ``POST /v1/events/batch`` with 500 events per request at 4 clients.
4. Group commit against no group commit (``--max-batch 1``): 64 clients on a fresh
   cluster per run, interleaved A, B, A, B ... for ``--rounds`` rounds; medians and
   ratios are reported.

Every load phase has an unmeasured warm-up of ``WARMUP_S``; every loop ends by time;
all traffic goes to 127.0.0.1. The Markdown report is printed and written to
``bench/results/<UTC timestamp>.md``; ``--json`` prints machine-readable results
instead of the table. Every node process is stopped on every exit path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import msgpack

from flexcore.cluster import LocalCluster
from flexcore.statemachine import Command, Ok, StateMachine, encode

WARMUP_S = 1.0
REQUEST_TIMEOUT_S = 15.0        # > the nodes' 5 s propose timeout: a hung request ends
BATCH_EVENTS = 500              # events per POST /v1/events/batch
BATCH_CLIENTS = 4
COMPARE_CLIENTS = 64
TARGET_P50_MS_AT_1 = 3.0
TARGET_OPS_AT_64 = 2500.0
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_JSON_HEADERS = {"Content-Type": "application/json"}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- machine facts -----------------------------------------------------------------------

def _proc_field(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return "unknown"


def machine_facts() -> dict[str, str]:
    mem = _proc_field("/proc/meminfo", "MemTotal")
    if mem.endswith(" kB") and mem[:-3].strip().isdigit():
        mem = f"{int(mem[:-3]) / 1024 / 1024:.1f} GiB"

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "platform": platform.platform(),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
        "cpu_count": str(os.cpu_count()),
        "memory_total": mem,
        "python": platform.python_version(),
        "pysyncobj": version("pysyncobj"),
        "aiohttp": version("aiohttp"),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


# -- CPU accounting (to tell client from server time) ----------------------------------

def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- load generation -------------------------------------------------------------------

@dataclass
class LoadResult:
    name: str
    clients: int
    target: str                       # "round-robin" | "leader"
    events_per_request: int
    seconds: float                    # measured wall time
    ok: int
    errors: int
    ops_per_s: float
    events_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    client_cpu_pct: float             # % of one core used by this process
    server_cpu_pct: float             # % of one core, summed over the node processes
    error_kinds: dict[str, int] = field(default_factory=dict)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence (None if empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


BodyFactory = Callable[[int, int], bytes]


def single_event_body(worker: int, i: int) -> bytes:
    return json.dumps({"type": "bench", "payload": {"n": i}}).encode()


def make_batch_body(events: int) -> BodyFactory:
    blob = json.dumps(
        {"events": [{"type": "bench", "payload": {"n": n}} for n in range(events)]}).encode()

    def body(worker: int, i: int) -> bytes:
        return blob
    return body


async def _phase(session: aiohttp.ClientSession, urls: Sequence[str], clients: int,
                 seconds: float, body: BodyFactory,
                 ) -> tuple[list[float], int, Counter[str], float]:
    """C workers post for ``seconds``; return (ok latencies s, errors, kinds, elapsed)."""
    latencies: list[float] = []
    kinds: Counter[str] = Counter()
    n_urls = len(urls)
    start = time.perf_counter()
    end = start + seconds

    async def worker(w: int) -> None:
        i = 0
        while time.perf_counter() < end:
            url = urls[(w + i) % n_urls]
            data = body(w, i)
            i += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=data, headers=_JSON_HEADERS) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                kinds[type(exc).__name__] += 1
                await asyncio.sleep(0.01)      # do not spin on a refused connection
                continue
            dt = time.perf_counter() - t0
            if status == 201:
                latencies.append(dt)
            else:
                kinds[f"HTTP {status}"] += 1

    await asyncio.gather(*(worker(w) for w in range(clients)))
    return latencies, sum(kinds.values()), kinds, time.perf_counter() - start


async def _load(urls: Sequence[str], clients: int, seconds: float, warmup: float,
                body: BodyFactory, pids: Sequence[int]) -> tuple[
                    list[float], int, Counter[str], float, float, float]:
    connector = aiohttp.TCPConnector(limit=max(clients, 1) + 4, limit_per_host=0,
                                     keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if warmup > 0:
            await _phase(session, urls, clients, warmup, body)
        c0 = _self_cpu_s()
        s0 = sum(_proc_cpu_s(p) for p in pids)
        lat, errors, kinds, elapsed = await _phase(session, urls, clients, seconds, body)
        client_cpu = _self_cpu_s() - c0
        server_cpu = sum(_proc_cpu_s(p) for p in pids) - s0
    return lat, errors, kinds, elapsed, client_cpu, server_cpu


def run_load(name: str, cluster: LocalCluster, *, clients: int, seconds: float,
             path: str, body: BodyFactory, events_per_request: int = 1,
             leader_only: bool = False) -> LoadResult:
    if leader_only:
        nodes = [cluster.nodes[cluster.leader_index(timeout=30)]]
    else:
        nodes = list(cluster.nodes)
    urls = [n.url + path for n in nodes]
    pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
    log(f"{name}: {clients} client(s) for {seconds:g} s (+{WARMUP_S:g} s warm-up)")
    lat, errors, kinds, elapsed, ccpu, scpu = asyncio.run(
        _load(urls, clients, seconds, WARMUP_S, body, pids))
    lat.sort()
    ok = len(lat)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    result = LoadResult(
        name=name, clients=clients, target="leader" if leader_only else "round-robin",
        events_per_request=events_per_request, seconds=round(elapsed, 3), ok=ok,
        errors=errors, ops_per_s=round(ok / elapsed, 1),
        events_per_s=round(ok * events_per_request / elapsed, 1),
        p50_ms=ms(percentile(lat, 0.50)), p99_ms=ms(percentile(lat, 0.99)),
        max_ms=ms(lat[-1] if lat else None),
        client_cpu_pct=round(100 * ccpu / elapsed, 1),
        server_cpu_pct=round(100 * scpu / elapsed, 1), error_kinds=dict(kinds))
    log(f"  -> {result.ops_per_s:g} req/s, {result.events_per_s:g} events/s, "
        f"p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, errors {errors}")
    return result


# -- in-process state machine ----------------------------------------------------------

@dataclass
class ApplyResult:
    name: str
    commands_per_entry: int
    events_per_command: int
    entries: int
    events: int
    apply_seconds: float
    events_per_s: float
    commands_per_s: float
    us_per_event: float
    refused: int


def bench_apply(seconds: float, commands_per_entry: int, events_per_command: int,
                ) -> ApplyResult:
    """Time ``StateMachine.apply_batch`` alone on entries built like ``RaftNode._send``.

    Entries are built between the timed calls, so the wall budget ``seconds`` is
    larger than the time reported; the rate is events over time inside apply_batch.
    """
    name = (f"apply_batch: {commands_per_entry} cmd x {events_per_command} event(s) "
            "per entry")
    log(f"in-process {name} for {seconds:g} s")
    machine = StateMachine()
    packer = msgpack.Packer(use_bin_type=True)
    n = index = refused = 0
    spent = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        envelopes = []
        for _ in range(commands_per_entry):
            batch = [{"type": "bench", "id": f"ev-{n + k}", "payload": {"n": n + k}}
                     for k in range(events_per_command)]
            n += events_per_command
            envelopes.append(encode(Command(type="event.publish", body={"events": batch},
                                            ts=int(time.time() * 1000),
                                            rid=uuid.uuid4().hex)))
        blob = packer.pack_array_header(len(envelopes)) + b"".join(envelopes)
        index += 1
        t0 = time.perf_counter()
        results = machine.apply_batch(blob, index)
        spent += time.perf_counter() - t0
        refused += sum(1 for r in results if not isinstance(r, Ok))
    events = index * commands_per_entry * events_per_command
    result = ApplyResult(
        name=name, commands_per_entry=commands_per_entry,
        events_per_command=events_per_command, entries=index, events=events,
        apply_seconds=round(spent, 3), events_per_s=round(events / spent, 1),
        commands_per_s=round(index * commands_per_entry / spent, 1),
        us_per_event=round(1e6 * spent / events, 2), refused=refused)
    log(f"  -> {result.events_per_s:g} events/s ({result.us_per_event} us/event), "
        f"refused {refused}")
    return result


# -- clusters --------------------------------------------------------------------------

def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class BenchCluster:
    """A LocalCluster in its own temp folder that always stops and cleans up."""

    def __init__(self, label: str, extra_args: Sequence[str]) -> None:
        self.label = label
        self._tmp = tempfile.TemporaryDirectory(prefix=f"flexcore-bench-{label}-")
        self.cluster = LocalCluster(3, Path(self._tmp.name), extra_args=list(extra_args))

    def __enter__(self) -> LocalCluster:
        log(f"starting 3-node cluster '{self.label}' "
            f"(extra args: {' '.join(self.cluster.extra_args) or 'none'})")
        self.cluster.start()
        try:
            leader = self.cluster.wait_leader(timeout=60)
            self.cluster.wait_ready(timeout=60)
        except BaseException:
            self._dump_logs()
            self.close()
            raise
        log(f"cluster '{self.label}' ready, leader {leader}")
        return self.cluster

    def _dump_logs(self) -> None:
        for node in self.cluster.nodes:
            print(f"--- {node.log_path} (tail) ---\n{_tail(node.log_path)}", file=sys.stderr)

    def close(self) -> None:
        try:
            self.cluster.close()
        finally:
            for node in self.cluster.nodes:   # belt and braces: nothing may outlive us
                if node.proc is not None and node.proc.poll() is None:
                    node.proc.kill()
                    node.proc.wait(timeout=10)
            self._tmp.cleanup()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and exc[0] is not KeyboardInterrupt:
            self._dump_logs()
        self.close()


# -- report ----------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def render_markdown(report: dict[str, Any]) -> str:
    facts: dict[str, str] = report["machine"]
    opts: dict[str, Any] = report["options"]
    out: list[str] = [f"# FlexCore API benchmark, {facts['date_utc']}", ""]
    out += ["| machine | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in facts.items()]
    out += ["", f"Options: {opts['seconds']:g} s per measurement (+{WARMUP_S:g} s warm-up), "
                f"rounds {opts['rounds']}, fsync {'on' if opts['fsync'] else 'off'}. "
                "The load generator runs on the same host as the 3 nodes. CPU columns are "
                "% of one core (client: this process; server: sum of the 3 nodes).", ""]

    loads: list[dict[str, Any]] = report["single"]
    if loads:
        out += ["## Single-event `POST /v1/events` (3-node cluster)", "",
                "| clients | target | ops/s | p50 ms | p99 ms | max ms | ok | errors "
                "| client CPU % | server CPU % |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in loads:
            out.append(f"| {r['clients']} | {r['target']} | {_fmt(r['ops_per_s'], 0)} | "
                       f"{_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['max_ms'])} | "
                       f"{r['ok']:,} | {r['errors']:,} | {_fmt(r['client_cpu_pct'], 0)} | "
                       f"{_fmt(r['server_cpu_pct'], 0)} |")
        out.append("")
        for target in report["targets"]:
            out.append(f"- Target {target['name']}: measured {_fmt(target['measured'])} "
                       f"-> **{target['verdict']}**")
        errs = {f"{r['clients']}/{r['target']}": r["error_kinds"] for r in loads
                if r["error_kinds"]}
        if errs:
            out.append(f"- Error kinds: {json.dumps(errs)}")
        out.append("")

    if report["apply"] or report["batch"]:
        out += ["## Batch throughput", "",
                "| measurement | events/s | p50 ms | p99 ms | errors | notes |",
                "|---|---:|---:|---:|---:|---|"]
        for a in report["apply"]:
            out.append(f"| in-process {a['name']} | {_fmt(a['events_per_s'], 0)} | - | - | "
                       f"{a['refused']} | {a['us_per_event']} us/event, "
                       f"{_fmt(a['commands_per_s'], 0)} commands/s |")
        b = report["batch"]
        if b:
            out.append(f"| `POST /v1/events/batch`, {b['events_per_request']} events x "
                       f"{b['clients']} clients | {_fmt(b['events_per_s'], 0)} | "
                       f"{_fmt(b['p50_ms'])} | {_fmt(b['p99_ms'])} | {b['errors']} | "
                       f"{_fmt(b['ops_per_s'], 1)} requests/s, client CPU "
                       f"{_fmt(b['client_cpu_pct'], 0)} %, server CPU "
                       f"{_fmt(b['server_cpu_pct'], 0)} % |")
        out.append("")

    cmp_: dict[str, Any] | None = report["compare"]
    if cmp_:
        out += [f"## Group commit (A) vs none (B, `--max-batch 1`): {COMPARE_CLIENTS} clients,"
                " round-robin, fresh cluster per run, interleaved", "",
                "| round | config | ops/s | p50 ms | p99 ms | errors | server CPU % |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for run in cmp_["runs"]:
            r = run["result"]
            out.append(f"| {run['round']} | {run['config']} | {_fmt(r['ops_per_s'], 0)} | "
                       f"{_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {r['errors']} | "
                       f"{_fmt(r['server_cpu_pct'], 0)} |")
        med = cmp_["median"]
        for cfg in ("A", "B"):
            m = med[cfg]
            out.append(f"| median | {cfg} | {_fmt(m['ops_per_s'], 0)} | {_fmt(m['p50_ms'])} | "
                       f"{_fmt(m['p99_ms'])} | {m['errors']:g} | "
                       f"{_fmt(m['server_cpu_pct'], 0)} |")
        out += ["", f"- ops/s ratio A/B (group commit / none): "
                    f"**{_fmt(cmp_['ratio_ops'])}x** (> 1: group commit is faster)",
                f"- p99 ratio A/B: **{_fmt(cmp_['ratio_p99'])}x** "
                "(< 1: group commit has the lower tail latency)", ""]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------

def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels expects e.g. 1,16,64, got {text!r}") from None
    if not levels or any(not 1 <= c <= 1024 for c in levels):
        raise argparse.ArgumentTypeError("--levels: each level must be 1..1024 clients")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.api_bench",
                                description="Benchmark a local 3-node FlexCore cluster.")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="measured seconds per load level (default 10)")
    p.add_argument("--levels", type=_levels, default=[1, 16, 64],
                   help="comma-separated client counts (default 1,16,64)")
    p.add_argument("--rounds", type=int, default=1,
                   help="A,B comparison rounds; medians reported when > 1 (default 1)")
    p.add_argument("--skip-compare", action="store_true",
                   help="skip the group commit vs --max-batch 1 comparison")
    p.add_argument("--fsync", action="store_true", help="start the nodes with --fsync")
    p.add_argument("--json", action="store_true",
                   help="print results as JSON instead of the Markdown table")
    return p


def _on_sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt("SIGTERM")


def run(args: argparse.Namespace) -> dict[str, Any]:
    base_args = ["--fsync"] if args.fsync else []
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "options": {"seconds": args.seconds, "levels": args.levels, "rounds": args.rounds,
                    "fsync": args.fsync, "compare": not args.skip_compare},
        "single": [], "targets": [], "apply": [], "batch": None, "compare": None,
    }

    # 1. In-process apply_batch, before any node competes for the CPU.
    report["apply"] = [asdict(bench_apply(args.seconds, 10, 1000)),
                       asdict(bench_apply(args.seconds, 1000, 1))]

    # 2./3. Single events per level, leader only, then batches, on one cluster.
    with BenchCluster("main", base_args) as cluster:
        singles = [run_load(f"POST /v1/events x{c}", cluster, clients=c,
                            seconds=args.seconds, path="/v1/events", body=single_event_body)
                   for c in args.levels]
        singles.append(run_load(f"POST /v1/events x{COMPARE_CLIENTS} leader only", cluster,
                                clients=COMPARE_CLIENTS, seconds=args.seconds,
                                path="/v1/events", body=single_event_body,
                                leader_only=True))
        report["single"] = [asdict(r) for r in singles]
        batch = run_load(f"POST /v1/events/batch x{BATCH_CLIENTS}", cluster,
                         clients=BATCH_CLIENTS, seconds=args.seconds,
                         path="/v1/events/batch", body=make_batch_body(BATCH_EVENTS),
                         events_per_request=BATCH_EVENTS)
        report["batch"] = asdict(batch)

    by_clients = {r.clients: r for r in singles if r.target == "round-robin"}
    one, many = by_clients.get(1), by_clients.get(64)
    if one is not None:
        report["targets"].append({
            "name": f"p50 <= {TARGET_P50_MS_AT_1:g} ms at 1 client", "measured": one.p50_ms,
            "verdict": "met" if one.p50_ms is not None and one.p50_ms <= TARGET_P50_MS_AT_1
            else "MISSED"})
    if many is not None:
        report["targets"].append({
            "name": f">= {TARGET_OPS_AT_64:,.0f} events/s at 64 clients",
            "measured": many.ops_per_s,
            "verdict": "met" if many.ops_per_s >= TARGET_OPS_AT_64 else "MISSED"})

    # 4. Group commit vs none, interleaved, each run on a fresh cluster.
    if not args.skip_compare:
        configs = {"A": base_args, "B": [*base_args, "--max-batch", "1"]}
        runs: list[dict[str, Any]] = []
        for rnd in range(1, args.rounds + 1):
            for cfg, extra in configs.items():
                with BenchCluster(f"{cfg}{rnd}", extra) as cluster:
                    r = run_load(f"compare {cfg} round {rnd}", cluster,
                                 clients=COMPARE_CLIENTS, seconds=args.seconds,
                                 path="/v1/events", body=single_event_body)
                runs.append({"round": rnd, "config": cfg, "result": asdict(r)})
        median: dict[str, dict[str, float | None]] = {}
        for cfg in configs:
            rs = [run["result"] for run in runs if run["config"] == cfg]
            median[cfg] = {k: _median([r[k] for r in rs])
                           for k in ("ops_per_s", "p50_ms", "p99_ms", "errors",
                                     "server_cpu_pct")}
        report["compare"] = {
            "clients": COMPARE_CLIENTS, "runs": runs, "median": median,
            "ratio_ops": _ratio(median["A"]["ops_per_s"], median["B"]["ops_per_s"]),
            "ratio_p99": _ratio(median["A"]["p99_ms"], median["B"]["p99_ms"]),
        }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.5 <= args.seconds <= 600:
        print("--seconds must be between 0.5 and 600", file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= 20:
        print("--rounds must be between 1 and 20", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even if started ignored
    try:
        report = run(args)
    except KeyboardInterrupt:
        log("interrupted; every node was stopped")
        return 130
    except TimeoutError as exc:
        log(f"cluster did not come up: {exc}")
        return 1
    markdown = render_markdown(report)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}.md"
    path.write_text(markdown + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown)
    log(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
