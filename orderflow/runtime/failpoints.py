"""Crash on purpose at a named moment, to prove that effects happen once.

Off unless ``ORDERFLOW_CRASH`` is set, as ``POINT:FUNCTION:ORDER_ID[:SUBJECT]``
with POINT one of :data:`POINTS` (for ``after-charge``, the gateway's
idempotency key ``charge-<ORDER_ID>`` stands for the order id; for
``after-write``, ``after-write:BUCKET:KEY[:N]``, the N-th write of that key by
the process, 1 if left out). The process
then SIGKILLs itself the first time it reaches that point for that order (and
input subject), leaving no chance to clean up, exactly like a power cut.
``ORDERFLOW_CRASH_MARKER`` names a file created just before dying, so the
restarted process does not die again and a test can tell that the crash
really happened.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

POINTS = (
    "after-charge",  # the gateway charged; payment has not recorded it
    "after-handle",  # the handler committed its state; nothing is published
    "after-publish",  # every output is published and acked; the input is not acked
    "after-write",  # a KV write is acked (e.g. one SKU of a reservation); the handler goes on
    "after-decide",  # a request's answer is decided (and stored); it is not sent
)

_SPEC = os.environ.get("ORDERFLOW_CRASH", "")
_MARKER = os.environ.get("ORDERFLOW_CRASH_MARKER", "")

# A misspelt point would never fire and the crash test would only say "never
# reached": fail at start instead, naming the points there are.
if _SPEC and _SPEC.split(":")[0] not in POINTS:
    raise ValueError(f"ORDERFLOW_CRASH={_SPEC!r}: the point must be one of {', '.join(POINTS)}")


def armed(point: str) -> bool:
    """Whether a crash is set at ``point``: lets a hot path skip the bookkeeping otherwise."""
    return _SPEC.split(":")[0] == point


def crash_point(point: str, function: str, order_id: str, subject: str = "") -> None:
    if not _SPEC:
        return
    want = _SPEC.split(":")
    got = [point, function, order_id, subject][: len(want)]
    if want != got or (_MARKER and Path(_MARKER).exists()):
        return
    if _MARKER:
        Path(_MARKER).write_text(f"{os.getpid()} {point} {function} {order_id} {subject}\n")
    os.kill(os.getpid(), signal.SIGKILL)
