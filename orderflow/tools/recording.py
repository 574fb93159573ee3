"""Recordings: a stream's messages as JSON Lines, one message per line.

Each line holds the subject, the headers, the payload (as text, or base64 when
it is not UTF-8), the stream sequence and the time it was stored. A recording
is plain data: it can be diffed, trimmed by hand, committed next to the tests
and replayed on any server (``orderflow.tools.replay``).

The first line says the format: ``{"orderflow_recording": 2}``. Version 2 is
the layout that files every event under its order (``order.<ID>.<kind>``,
``orderflow/subjects.py``); a recording without the line was made before it,
with subjects this version neither reads nor writes, and is refused with a
message saying so rather than replayed into nonsense.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import msgspec
from nats.aio.client import Client

from orderflow.tools.streamlog import Stored, read_stream


class Recorded(msgspec.Struct, frozen=True, omit_defaults=True):
    subject: str
    sequence: int
    time: str
    headers: dict[str, str] = {}
    payload: str | None = None  # the bytes as UTF-8 text...
    payload_b64: str | None = None  # ...or, when they are not text, as base64

    @classmethod
    def from_stored(cls, stored: Stored) -> Recorded:
        try:
            text: str | None = stored.data.decode()
            b64 = None
        except UnicodeDecodeError:
            text, b64 = None, base64.b64encode(stored.data).decode()
        return cls(
            subject=stored.subject,
            sequence=stored.sequence,
            time=stored.time.isoformat(),
            headers=stored.headers,
            payload=text,
            payload_b64=b64,
        )

    @property
    def data(self) -> bytes:
        if self.payload_b64 is not None:
            return base64.b64decode(self.payload_b64)
        return (self.payload or "").encode()

    @property
    def timestamp(self) -> float:
        return datetime.fromisoformat(self.time).timestamp()


#: The format this version writes and reads.
FORMAT_VERSION = 2


class Header(msgspec.Struct, frozen=True):
    orderflow_recording: int


class RecordingError(Exception):
    pass


def write(records: Iterable[Recorded], path: Path) -> int:
    encoder = msgspec.json.Encoder()
    count = 0
    with path.open("wb") as out:
        out.write(encoder.encode(Header(FORMAT_VERSION)) + b"\n")
        for record in records:
            out.write(encoder.encode(record) + b"\n")
            count += 1
    return count


def read(path: Path) -> list[Recorded]:
    decoder = msgspec.json.Decoder(Recorded)
    with path.open("rb") as file:
        lines = [line for line in file if line.strip()]
    try:
        version = msgspec.json.decode(lines[0], type=Header).orderflow_recording if lines else 0
    except (msgspec.DecodeError, msgspec.ValidationError):
        version = 0
    if version != FORMAT_VERSION:
        made = f"format {version}" if version else "no format line (an older orderflow)"
        raise RecordingError(
            f"{path}: {made}, but this version reads format {FORMAT_VERSION} "
            "(every event filed under its order, order.<ID>.<kind>). Record it again "
            "with `runner.py record` from a flow run by this version."
        )
    return [decoder.decode(line) for line in lines[1:]]


async def record(
    nc: Client,
    stream: str,
    path: Path,
    subjects: list[str] | None = None,
    since: datetime | None = None,
    from_seq: int = 1,
    progress: bool = False,
) -> int:
    """Write ``stream`` (optionally filtered) to ``path``; returns how many messages."""
    total = (await nc.jetstream().stream_info(stream)).state.messages
    report: Callable[[int], None] | None = None
    if progress:

        def report(done: int) -> None:
            print(f"\r  recorded {done}/{total} messages", end="", file=sys.stderr, flush=True)

    stored = await read_stream(
        nc, stream, subjects=subjects, from_seq=from_seq, since=since, on_batch=report
    )
    if progress:
        print(file=sys.stderr)
    return write((Recorded.from_stored(s) for s in stored), path)
