"""The record of an intervention, as the interventions stream keeps it: who, what, when, why.

Written by whoever intervenes: ``runner.py pause``/``resume`` for a function
(``interventions.function.<name>``), the ``cancel`` function for every
cancellation it answers, whoever asked (``interventions.order.<ID>``). Read by
``trace``, ``status`` and the console. Records are only ever added.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import msgspec


class Intervention(msgspec.Struct, frozen=True, omit_defaults=True):
    action: Literal["pause", "resume", "cancel"]
    function: str  # "" for an order's
    by: str
    at: str  # RFC 3339, UTC
    reason: str = ""
    until: str = ""  # a pause's end, if it has one
    order_id: str = ""  # a cancellation's order, and its request and answer:
    request_id: str = ""
    answer: str = ""
    rule: str = ""


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
