"""``functions.history.History`` on the stream itself: an order's events, read by subject.

``last`` asks the server for the last message on one subject
(``order.<ID>.<kind>``): its subject index finds it without reading anything
else, so the cost does not grow with the history, and decodes it the way the
runner decodes its input (``orderflow.runtime.decoding``): an event stored by
an older version of the code is upgraded to the current schema first.
``append`` is the runner's
own emit (``orderflow.runtime.emit``), so an event a handler appends is guarded,
checked against ``emits`` and carries its context exactly like one it returns.

Reads made at the same time by the messages a process has in hand are asked
together (``orderflow.runtime.batch``): one batch direct get (``multi_last``) answers
them all, so a busy process pays one request for many reads.

A join is only sound if a read cannot miss what was stored before it. One
server: a direct get sees every stored message, and a batch one resolves
every subject as of the moment it is asked. A cluster: any replica
answers a direct get, and one that is behind could miss the other half, so
there every read goes to the stream's leader (``STREAM.MSG.GET``), which has
stored everything it acknowledged.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import TypeVar

import msgspec
from nats.aio.client import Client

from functions.errors import Permanent
from functions.events import Event, event_id, subject_of
from orderflow import subjects
from orderflow.runtime import decoding, direct, election
from orderflow.runtime.batch import Batcher
from orderflow.runtime.emit import Cause, Emitter

E = TypeVar("E", bound=Event)

#: Reads asked in one batch direct get at most.
READS_TOGETHER = 256

#: A stored message as a read finds it: its payload and its headers.
Found = tuple[bytes, dict[str, str]]


class HistoryError(Exception):
    pass


class _Message(msgspec.Struct):
    data: str = ""
    hdrs: str = ""  # base64 of the NATS header block, when it has headers


class _GetError(msgspec.Struct):
    code: int = 0
    description: str = ""


class _GetReply(msgspec.Struct):
    message: _Message | None = None
    error: _GetError | None = None


_decode_reply = msgspec.json.Decoder(_GetReply).decode
_encode = msgspec.json.Encoder().encode


class OrderLog:
    """Reads of one stream's order subjects, from any replica or from the leader only."""

    def __init__(self, nc: Client, stream: str, leader_only: bool, timeout: float = 5.0) -> None:
        self.nc = nc
        self.stream = stream
        self.leader_only = leader_only
        self.timeout = timeout
        self._direct = subjects.direct_get(stream) + "."
        self._leader = subjects.leader_get(stream)
        self._many = direct.BatchGet(nc, stream, timeout)
        self._together: Batcher[str, Found | None] = Batcher(self._read_many, READS_TOGETHER)

    async def last(self, order_id: str, kind: type[E]) -> E | None:
        name = subject_of(kind)
        stored = await self.last_message(subjects.subject(name, order_id))
        if stored is None:
            return None
        data, headers = stored
        found = decoding.read(name, data, decoding.version_in(headers))
        assert isinstance(found, kind)
        return found

    async def last_message(self, subject: str) -> Found | None:
        """The payload and headers of the last message on ``subject``, or ``None``."""
        if self.leader_only:
            body = _encode({"last_by_subj": subject})
            answer = await election.request(self.nc, self._leader, body, self.timeout)
            got = _decode_reply(answer.data)
            if got.error is not None:
                if got.error.code == 404:
                    return None
                raise HistoryError(f"{self.stream}: reading {subject}: {got.error.description}")
            assert got.message is not None
            return base64.b64decode(got.message.data), _headers(got.message.hdrs)
        return await self._together(subject)

    async def _read_many(self, wanted: Sequence[str]) -> list[Found | None]:
        # Asked again while no server answers for the stream (orderflow.runtime.election).
        found = await election.retrying(lambda: self._many.last_of(wanted), self.timeout)
        by_subject = {
            (headers := msg.headers or {}).get("Nats-Subject", ""): (msg.data, headers)
            for msg in found
        }
        return [by_subject.get(subject) for subject in wanted]


def _headers(block: str) -> dict[str, str]:
    """The headers in a stored message's header block (``NATS/1.0`` and ``Name: value`` lines,
    base64 in a message get's answer)."""
    lines = base64.b64decode(block).decode().split("\r\n")[1:] if block else []
    return {
        name.strip(): value.strip()
        for name, sep, value in (line.partition(":") for line in lines)
        if sep
    }


class MessageHistory:
    """The history one handled message sees: reads from the log, appends as its effects."""

    def __init__(
        self, log: OrderLog, emitter: Emitter, cause: Cause, reads: frozenset[str]
    ) -> None:
        self.log = log
        self.emitter = emitter
        self.cause = cause
        self.reads = reads
        #: Ids of the events appended, so the runner does not publish them again.
        self.appended: set[str] = set()

    async def last(self, order_id: str, kind: type[E]) -> E | None:
        if subject_of(kind) not in self.reads:
            # A bug: streams.yaml is the list of what a function touches (and
            # what its generated permissions allow it to read).
            raise Permanent(
                f"{self.emitter.function} read {subject_of(kind)}, not in "
                f"functions.{self.emitter.function}.reads ({', '.join(sorted(self.reads))})"
            )
        return await self.log.last(order_id, kind)

    async def append(self, event: Event) -> None:
        self.emitter.check([event])
        await self.emitter.emit(event, self.cause)
        self.appended.add(event_id(event))
