"""Dead letters: where a message goes when it cannot be handled, with the reason.

The original bytes are kept intact; the headers say why, who gave up, where
the message came from and when, so it can be read, fixed and redriven to its
original subject. A message is dead-lettered before its input is acked, and
under a message id derived from its stream position, so a crash in between
redelivers it without filing it twice.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.aio.msg import Msg

from orderflow import subjects
from orderflow.config import DeadLetterSpec
from orderflow.runtime import election
from orderflow.runtime.context import input_event_id
from orderflow.runtime.decoding import order_of, readable_order_id
from orderflow.runtime.logs import fields

log = logging.getLogger("orderflow.runtime.deadletter")

# Header names, documented in docs/effects-once.md.
REASON = "Orderflow-Dlq-Reason"
FUNCTION = "Orderflow-Dlq-Function"
SUBJECT = "Orderflow-Dlq-Subject"
STREAM = "Orderflow-Dlq-Stream"
SEQUENCE = "Orderflow-Dlq-Sequence"
DELIVERIES = "Orderflow-Dlq-Deliveries"
TIME = "Orderflow-Dlq-Time"

MAX_REASON = 1000  # header values stay readable, and within the server's limits


def _header_safe(text: str) -> str:
    return " ".join(text.split())[:MAX_REASON]


class DeadLetterRefused(Exception):
    pass


class DeadLetters:
    def __init__(self, nc: Client, spec: DeadLetterSpec, function: str) -> None:
        self.nc = nc
        self.function = function
        self.prefix = spec.subject_prefix

    async def add(self, msg: Msg, reason: str) -> None:
        meta = msg.metadata
        # The original's own headers, but none that tells JetStream what to do
        # with a publish (Nats-Msg-Id, Nats-Expected-Last-Subject-Sequence...):
        # they were meant for the original's subject, not for this one.
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers.update(
            {
                "Nats-Msg-Id": f"dlq:{self.function}:{meta.stream}:{meta.sequence.stream}",
                REASON: _header_safe(reason),
                FUNCTION: self.function,
                SUBJECT: msg.subject,
                STREAM: meta.stream,
                SEQUENCE: str(meta.sequence.stream),
                DELIVERIES: str(meta.num_delivered),
                TIME: datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        )
        # Filed under the order (orderflow/subjects.py): trace finds it by id.
        subject = subjects.dead_letter(self.prefix, order_of(msg.subject, msg.data), self.function)
        ack = await election.store(self.nc, subject, msg.data, headers)
        if ack.error is not None:
            # Not stored: the input stays unacked and comes back after ack_wait.
            raise DeadLetterRefused(f"{subject}: {ack.error.err_code} {ack.error.description}")
        await msg.ack()
        log.warning(
            "%s: dead-lettered %s (stream %s seq %d): %s",
            self.function, msg.subject, meta.stream, meta.sequence.stream, reason,
            extra=fields(self.function, msg.subject, readable_order_id(msg.data),
                         input_event_id(msg.headers or {}, meta.stream, meta.sequence.stream)),
        )  # fmt: skip
