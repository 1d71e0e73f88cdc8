"""A cluster-wide cron job: every REPORT_INTERVAL_S seconds (default 60) one node — the
Raft leader — counts the orders in the log and publishes a ``report.orders`` event.

    REPORT_INTERVAL_S=5 python examples/cron_report.py --self 127.0.0.1:7100 \
        --api 127.0.0.1:8100 --data-dir /tmp/report
    curl 'localhost:8100/v1/events?type=report.*'

The timer is a replicated schedule: each fire is claimed through Raft before it runs,
so with the same program on every node a fire runs once, and the report's event id
(derived from the fire time) makes a re-run after a failover publish nothing twice.
"""

from __future__ import annotations

import os
import sys

from flexcore import FlexCore
from flexcore.config import SettingsError, load_settings
from flexcore.node import setup_logging
from flexcore.timers import Fire


def build(argv: list[str]) -> FlexCore:
    settings = load_settings(argv)
    setup_logging(settings.log_level)
    app = FlexCore(settings)
    interval = float(os.environ.get("REPORT_INTERVAL_S", "60"))

    @app.timer({"interval_s": interval}, id="order-report", misfire="skip")
    async def order_report(fire: Fire) -> None:
        orders, after = 0, 0
        while True:
            page = await app.read_events(after, type="order.*", limit=1000)
            orders += len(page.events)
            if page.next == after:
                break
            after = page.next
        await app.publish("report.orders", {"orders": orders,
                                            "fire_time": fire.fire_time.isoformat()},
                          id=f"report:{fire.fire_time_ms}")

    return app


def main(argv: list[str]) -> int:
    try:
        app = build(argv)
    except (SettingsError, ValueError) as exc:
        print(f"cron_report: error: {exc}", file=sys.stderr)
        return 2
    return app.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
