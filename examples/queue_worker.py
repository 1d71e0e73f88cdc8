"""A queue worker: sends the e-mails enqueued on ``emails`` and records each one sent.

    python examples/queue_worker.py --self 127.0.0.1:7100 --api 127.0.0.1:8100 \
        --data-dir /tmp/mailer
    curl -X POST localhost:8100/v1/queues/emails/messages -d '{"body": {"to": "a@example.com"}}'
    curl 'localhost:8100/v1/events?type=email.*'        # one email.sent per message

Four concurrent loops lease messages; a handler that raises is retried with backoff
(here: addresses at ``invalid.example`` always fail) and after three attempts the
message lands in the queue's dead letters (``GET /v1/queues/emails/dead``). Delivery is
at-least-once, so the "sent" record uses an id derived from the message: a message
delivered twice is recorded once.
"""

from __future__ import annotations

import sys

from flexcore import FlexCore
from flexcore.config import SettingsError, load_settings
from flexcore.node import setup_logging
from flexcore.queues import Message


def build(argv: list[str]) -> FlexCore:
    settings = load_settings(argv)
    setup_logging(settings.log_level)
    app = FlexCore(settings)

    @app.worker("emails", concurrency=4, max_attempts=3, backoff_s=0.2)
    async def send(message: Message) -> None:
        to = str(message.body["to"])
        if to.endswith("@invalid.example"):
            raise ValueError(f"mailbox {to} does not exist")
        await app.publish("email.sent", {"to": to, "attempt": message.attempt},
                          key=to, id=f"email:{message.id}")

    return app


def main(argv: list[str]) -> int:
    try:
        app = build(argv)
    except SettingsError as exc:
        print(f"queue_worker: error: {exc}", file=sys.stderr)
        return 2
    return app.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
