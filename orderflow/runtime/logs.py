"""Logging for people and for log shippers: the same records, as text or as JSON lines.

Every record about a message carries its context as structured fields
(``function``, ``subject``, its ``kind``, ``order_id``, ``event_id``): in text they are
part of the message, in JSON (``--log-format json``) they are keys of their
own, so a shipper can index and filter on them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from orderflow.subjects import kind_of


def fields(function: str, subject: str, order_id: str | None, event_id: str) -> dict[str, object]:
    """``extra=`` for a log call about one message."""
    return {"fields": {"function": function, "subject": subject, "kind": kind_of(subject),
                       "order_id": order_id, "event_id": event_id}}  # fmt: skip


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
