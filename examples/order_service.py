"""An order service that embeds a FlexCore node and bills orders as they arrive.

    python examples/order_service.py --self 127.0.0.1:7100 --api 127.0.0.1:8100 \
        --data-dir /tmp/orders            # any `python -m flexcore.node` flag or env var

    curl -X POST localhost:8100/v1/events \
        -d '{"type": "order.created", "key": "o-1", "payload": {"total": 40, "customer": "c-7"}}'
    curl 'localhost:8100/v1/events?type=invoice.*'      # one invoice.issued per order

Run it on every node of a cluster (same flags as the node, ``--peers`` listing all):
the ``billing`` consumer group hands each order to one node, in order per order key,
at least once; the invoice's event id is derived from the order, so a redelivery
publishes nothing twice. Orders with a total of 0 are filtered out; a transform turns
the event into the invoice input; the tax table is a component injected by type.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from flexcore import Event, FlexCore, Retry
from flexcore.config import SettingsError, load_settings
from flexcore.node import setup_logging


@dataclass(frozen=True)
class TaxTable:
    """A dependency of the handler, registered with ``app.provide``."""

    rate: float


def build(argv: list[str]) -> FlexCore:
    settings = load_settings(argv)
    setup_logging(settings.log_level)
    app = FlexCore(settings)
    app.provide(TaxTable, TaxTable(rate=0.2))

    @app.on_event("order.created", group="billing", where="payload.total > `0`",
                  transform="{order: key, net: payload.total, customer: payload.customer}",
                  retry=Retry(max_attempts=5, backoff=0.2))
    async def issue_invoice(event: Event, taxes: TaxTable) -> None:
        order = event.payload
        await app.publish("invoice.issued",
                          {"order": order["order"], "customer": order["customer"],
                           "gross": round(order["net"] * (1 + taxes.rate), 2)},
                          key=order["order"], id=f"invoice:{order['order']}")

    return app


def main(argv: list[str]) -> int:
    try:
        app = build(argv)
    except SettingsError as exc:
        print(f"order_service: error: {exc}", file=sys.stderr)
        return 2
    return app.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
