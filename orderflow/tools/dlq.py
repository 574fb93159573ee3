"""``dlq list | show | redrive``: read the dead letters, and send them back once fixed.

A dead letter is identified by its sequence in the dead-letter stream. Redrive
republishes the original bytes to the original subject and, once the stream
has acknowledged them, deletes the dead letter. When several functions
dead-lettered the same message (an invalid order is refused by every function
that reads it), they share one original, so the republish carries a message id
derived from that original: redriving all of them publishes it once.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client

from orderflow.config import Topology
from orderflow.runtime import deadletter as dl
from orderflow.tools.streamlog import Stored, read_subject


@dataclass(frozen=True)
class DeadLetter:
    id: int
    function: str
    subject: str
    stream: str
    sequence: int
    deliveries: int
    time: str
    reason: str
    headers: dict[str, str]
    data: bytes

    @classmethod
    def from_stored(cls, stored: Stored) -> DeadLetter:
        h = stored.headers
        return cls(
            id=stored.sequence,
            function=h.get(dl.FUNCTION, "?"),
            subject=h.get(dl.SUBJECT, "?"),
            stream=h.get(dl.STREAM, "?"),
            sequence=int(h.get(dl.SEQUENCE, "0")),
            deliveries=int(h.get(dl.DELIVERIES, "0")),
            time=h.get(dl.TIME, ""),
            reason=h.get(dl.REASON, ""),
            headers=h,
            data=stored.data,
        )

    def original_headers(self) -> dict[str, str]:
        return {
            k: v for k, v in self.headers.items() if not k.startswith(("Orderflow-Dlq-", "Nats-"))
        }

    def as_json(self) -> dict[str, object]:
        try:
            payload: object = {"text": self.data.decode()}
        except UnicodeDecodeError:
            payload = {"base64": base64.b64encode(self.data).decode()}
        return {
            "id": self.id,
            "function": self.function,
            "subject": self.subject,
            "stream": self.stream,
            "sequence": self.sequence,
            "deliveries": self.deliveries,
            "time": self.time,
            "reason": self.reason,
            "headers": self.original_headers(),
            "payload": payload,
        }


async def dead_letters(nc: Client, topology: Topology) -> list[DeadLetter]:
    """Every dead letter kept, oldest first: one batch direct get of the prefix (no consumer)."""
    letters = topology.dead_letters
    stored = await read_subject(nc, letters.stream, f"{letters.subject_prefix}.>")
    return [DeadLetter.from_stored(s) for s in stored]


def render_table(letters: list[DeadLetter], width: int = 60) -> str:
    if not letters:
        return "no dead letters"
    rows = [("ID", "TIME", "FUNCTION", "SUBJECT", "SEQ", "TRIES", "REASON")]
    for d in letters:
        reason = d.reason if len(d.reason) <= width else d.reason[: width - 1] + "…"
        rows.append(
            (
                str(d.id),
                d.time[:23],
                d.function,
                d.subject,
                str(d.sequence),
                str(d.deliveries),
                reason,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )


def render_one(letter: DeadLetter) -> str:
    return json.dumps(letter.as_json(), indent=2)


def matching(
    letters: list[DeadLetter], function: str = "", reason: str = "", since: datetime | None = None
) -> list[DeadLetter]:
    """The letters given up by ``function``, whose reason contains ``reason``, dead-lettered at
    or after ``since``; an empty filter matches every letter."""
    chosen = []
    for d in letters:
        if function and d.function != function:
            continue
        if reason and reason not in d.reason:
            continue
        if since is not None and (not d.time or datetime.fromisoformat(d.time) < since):
            continue
        chosen.append(d)
    return chosen


def since_of(text: str) -> datetime | None:
    """``--since``: an ISO time, UTC unless it says otherwise; "" for none."""
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def redrive(nc: Client, topology: Topology, letters: list[DeadLetter]) -> list[str]:
    """Republish each letter to its original subject; delete it once the stream accepted it."""
    js = nc.jetstream()
    report = []
    for letter in letters:
        headers = letter.original_headers()
        headers["Nats-Msg-Id"] = f"redrive:{letter.stream}:{letter.sequence}"
        ack = await js.publish(letter.subject, letter.data, headers=headers)
        await js.delete_msg(topology.dead_letters.stream, letter.id)
        how = "already redriven" if ack.duplicate else f"now {ack.stream} seq {ack.seq}"
        report.append(f"{letter.id}: {letter.subject} (was seq {letter.sequence}) -> {how}")
    return report
