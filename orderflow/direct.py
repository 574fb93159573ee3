"""A direct get's answer: the message, nothing (404), or an error that says what was asked.

``$JS.API.DIRECT.GET.<stream>.<subject>`` answers with the subject's last
message as it is stored (headers and payload, no JSON around it), or with an
empty message whose ``Status`` header says why not. KV reads and an order's
history both ask this way.
"""

from __future__ import annotations

from nats.aio.msg import Msg


class DirectGetError(Exception):
    pass


def found(msg: Msg, what: str) -> Msg | None:
    """``msg`` if it is a stored message; ``None`` if there is none; else raise."""
    headers = msg.headers or {}
    if msg.data or "Status" not in headers:
        return msg
    if headers["Status"] == "404":
        return None
    raise DirectGetError(f"{what}: {headers['Status']} {headers.get('Description', '')}".rstrip())
