"""The published contract: an AsyncAPI 3 document and a JSON Schema per event, generated from
``streams.yaml`` and the msgspec Structs, never written by hand.

What the document says, and where each part comes from:

* **channels**: every address a function consumes or emits, and the ingress; one channel per
  address (``order.{order_id}.payments.succeeded``), the order id its parameter
  (``orderflow/subjects.py`` builds the subjects, so the addresses are the ones the runtime uses);
* **operations**: what each function receives (its durable consumers) and sends (its
  ``emits``), in either wiring (tagged ``choreography`` or ``orchestration``), and what the
  outside world sends (the kinds some function consumes and none emits) and may watch (those
  some function emits and none consumes), the rule ``orderflow/ops/auth.py`` grants by;
* **messages**: one per event kind (``functions/events.py``, whatever kinds it holds): its
  payload schema from the Struct, its headers (the context of ``orderflow/runtime/context.py``,
  with the schema versions it is read at), the order id as its correlation id;
* **requests**: what a function answers at once (``serves``: ``orders.cancel``), a
  channel with the request and a reply on the requester's inbox, the answer or a problem;
* **components.schemas**: the JSON Schema of every Struct (``msgspec.json.schema_components``);
  ``schemas/<kind>.json`` beside the document has the same per event, standalone.

The schemas are the readers': no event forbids properties it does not know, and ``type``
is not required (publishers may leave it out; decoding goes by subject). Functions write
exactly the properties listed, ``type`` included (docs/contract.md).
"""

from __future__ import annotations

import inspect
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgspec

from functions.events import (
    EVENT_CLASSES,
    EVENT_TYPES,
    REQUEST_TYPES,
    CancelAnswer,
    Event,
    OrderId,
    subject_of,
)
from orderflow import subjects
from orderflow.config import Mode, Topology
from orderflow.runtime import context
from orderflow.runtime.connect import DEFAULT_URL
from orderflow.runtime.requests import Problem

#: The document's name beside its schemas (``contract/asyncapi.json``).
DOCUMENT = "asyncapi.json"
SCHEMAS = "schemas"
ASYNCAPI_VERSION = "3.1.0"
#: The order id, where it stands in an address; the channels' one parameter.
PARAMETER = "order_id"
#: Who publishes what no function emits, and watches what no function reads.
CLIENT = "client"
#: Extension of a message: the version of its schema functions write.
VERSION_KEY = "x-orderflow-schema-version"

JSON = dict[str, Any]

_HEADERS: dict[str, JSON] = {
    context.EVENT_ID: {
        "description": "The event's own id, `<kind>:<order id>` (a command or an alarm adds "
        "its attempt). Absent on what clients publish."
    },
    context.CORRELATION_ID: {
        "description": "The order id, the same on every event the functions emit for the order."
    },
    context.CAUSATION_ID: {
        "description": "The id of the event that caused this one: its "
        f"{context.EVENT_ID}, or `<stream>:<sequence>` for an input that had none."
    },
    context.FUNCTION: {"description": "The function that emitted it."},
    context.TRACEPARENT: {
        "description": "W3C trace context: one trace per order, a span per event.",
        "pattern": "^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    },
}

_DESCRIPTION = f"""\
Order processing as small stateless functions on NATS JetStream, generated from streams.yaml \
and functions/events.py by `runner.py contract`.

Every event belongs to one order and is stored on the order's own subject, \
`order.{{{PARAMETER}}}.<kind>`; clients may also publish `orders.created` on its own. \
Readers are tolerant: a property a schema does not list is ignored, and `type` (the kind) may \
be left out. Writers are strict: the functions write exactly the properties listed. Each \
message says the schema version it was written with in its `{context.SCHEMA_VERSION}` header \
(none means 1); older versions are upgraded on read (functions/upcasters.py). \
`runner.py contract --check OLD.json` says whether a change breaks readers or writers of an \
older contract (docs/contract.md)."""


def _address(subject: str) -> str:
    """A subject filter as a channel address: the order id's ``*`` is the parameter."""
    return ".".join(f"{{{PARAMETER}}}" if token == "*" else token for token in subject.split("."))


def _channel_id(address: str) -> str:
    """``order.{order_id}.payments.succeeded`` -> ``order.payments.succeeded``."""
    return ".".join(t for t in address.split(".") if t != f"{{{PARAMETER}}}")


@dataclass
class _Operation:
    actor: str
    action: str  # "send" or "receive"
    address: str
    kinds: set[str] = field(default_factory=set)
    modes: set[Mode] = field(default_factory=set)
    consumers: set[str] = field(default_factory=set)  # "durable on STREAM (mode)"

    @property
    def id(self) -> str:
        return f"{self.actor}.{self.action}.{_channel_id(self.address)}"


def _operations(wirings: Mapping[Mode, Topology]) -> list[_Operation]:
    found: dict[tuple[str, str, str], _Operation] = {}

    def add(actor: str, action: str, subject: str, kind: str, mode: Mode, via: str = "") -> None:
        address = _address(subject)
        op = found.setdefault((actor, action, address), _Operation(actor, action, address))
        op.kinds.add(kind)
        op.modes.add(mode)
        if via:
            op.consumers.add(via)

    for mode, topology in wirings.items():
        consumed: set[str] = set()
        emitted: set[str] = set()
        for name, fn in topology.functions.items():
            for consumer in fn.consumers:
                for kind in consumer.events:
                    consumed.add(kind)
                    via = f"durable `{consumer.durable}` on {consumer.stream} ({mode})"
                    for subject in subjects.filters(kind):
                        add(name, "receive", subject, kind, mode, via)
            for kind in fn.emits:
                emitted.add(kind)
                add(name, "send", subjects.published_on(kind, "*"), kind, mode)
        for kind in sorted(consumed - emitted):
            for subject in subjects.filters(kind):
                add(CLIENT, "send", subject, kind, mode)
        # The runner's own alarms are no one else's business.
        for kind in sorted(emitted - consumed - subjects.ALARM_KINDS):
            add(CLIENT, "receive", subjects.published_on(kind, "*"), kind, mode)
    return sorted(found.values(), key=lambda op: (op.actor != CLIENT, op.actor, op.id))


def _reading(schema: JSON) -> JSON:
    """A Struct's schema as readers take it: its tag (``type``) may be left out."""
    required = [name for name in schema.get("required", []) if name != "type"]
    out = {k: v for k, v in schema.items() if k != "required"}
    return out | {"required": required} if required else out


def _doc(cls: type[Event]) -> tuple[str, str]:
    """The class docstring as (summary, description)."""
    lines = (cls.__doc__ or "").strip().splitlines()
    if not lines:
        return "", ""
    summary, rest = lines[0].strip(), "\n".join(lines[1:])
    return summary, inspect.cleandoc(rest)


def versions_read(cls: type[Event]) -> list[str]:
    """The schema versions a reader of ``cls`` takes, oldest first (as header values)."""
    return [str(v) for v in range(1, cls.schema_version + 1)]


def _headers(cls: type[Event]) -> JSON:
    version = {
        "type": "string",
        "enum": versions_read(cls),
        "default": "1",
        "description": f"The version of the schema the payload was written with; the functions "
        f"write {cls.schema_version}. None means 1; an older version is upgraded on read.",
    }
    properties = {context.SCHEMA_VERSION: version} | {
        name: {"type": "string"} | spec for name, spec in _HEADERS.items()
    }
    return {"type": "object", "properties": properties}


def _message(cls: type[Event]) -> JSON:
    summary, description = _doc(cls)
    message: JSON = {"name": subject_of(cls), "title": cls.__name__}
    if summary:
        message["summary"] = summary
    if description:
        message["description"] = description
    return message | {
        "contentType": "application/json",
        "headers": _headers(cls),
        "payload": {"$ref": f"#/components/schemas/{cls.__name__}"},
        "correlationId": {"$ref": f"#/components/correlationIds/{PARAMETER}"},
        VERSION_KEY: cls.schema_version,
    }


def _order_id_rule() -> str:
    schema = msgspec.json.schema(OrderId)
    return (
        f"{schema['minLength']}-{schema['maxLength']} characters matching `{schema['pattern']}` "
        "(a subject token: no dots, spaces or wildcards)"
    )


def document(
    wirings: Mapping[Mode, Topology], classes: Iterable[type[Event]] = EVENT_CLASSES
) -> JSON:
    """The AsyncAPI 3 document of both wirings (``mode -> topology``) and the event ``classes``."""
    classes = list(classes)
    by_kind = {subject_of(cls): cls for cls in classes}
    operations = _operations(wirings)
    channels: dict[str, set[str]] = defaultdict(set)  # address -> kinds
    for op in operations:
        channels[op.address] |= op.kinds
    channel_docs: JSON = {}
    for address in sorted(channels, key=_channel_id):
        kinds = [k for k in by_kind if k in channels[address]]
        doc: JSON = {
            "address": address,
            "messages": {k: {"$ref": f"#/components/messages/{k}"} for k in kinds},
        }
        if f"{{{PARAMETER}}}" in address:
            doc["parameters"] = {PARAMETER: {"$ref": f"#/components/parameters/{PARAMETER}"}}
        channel_docs[_channel_id(address)] = doc
    operation_docs: JSON = {}
    for op in operations:
        channel = _channel_id(op.address)
        kinds = [k for k in by_kind if k in op.kinds]
        verb = "sends" if op.action == "send" else "receives"
        doc = {
            "action": op.action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": f"{op.actor} {verb} {', '.join(kinds)}",
            "messages": [{"$ref": f"#/channels/{channel}/messages/{k}"} for k in kinds],
            "tags": [{"name": mode} for mode in sorted(op.modes)],
        }
        if op.consumers:
            doc["description"] = "From " + "; ".join(sorted(op.consumers)) + "."
        operation_docs[op.id] = doc
    requests, request_messages = _requests(wirings, channel_docs, operation_docs)
    _, components = msgspec.json.schema_components(
        [*classes, *requests, CancelAnswer, Problem], ref_template="#/components/schemas/{name}"
    )
    host = urlparse(DEFAULT_URL)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "orderflow",
            "version": metadata.version("orderflow"),
            "description": _DESCRIPTION,
            "tags": [
                {"name": "choreography", "description": "functions react to each other's events"},
                {"name": "orchestration", "description": "an orchestrator drives each order"},
            ],
        },
        "servers": {
            "local": {
                "host": host.netloc,
                "protocol": host.scheme,
                "description": "The server of `runner.py up`; any NATS server with JetStream "
                "provisioned by `runner.py provision` will do.",
            }
        },
        "defaultContentType": "application/json",
        "channels": channel_docs,
        "operations": operation_docs,
        "components": {
            "schemas": {name: _reading(schema) for name, schema in components.items()},
            "messages": {kind: _message(cls) for kind, cls in by_kind.items()} | request_messages,
            "parameters": {
                PARAMETER: {
                    "description": f"The order's id: {_order_id_rule()}.",
                    "location": f"$message.payload#/{PARAMETER}",
                    "examples": ["o-1001"],
                }
            },
            "correlationIds": {
                PARAMETER: {
                    "description": "The order id: in the payload of every event of the order "
                    f"(and in the {context.CORRELATION_ID} header of those the functions emit).",
                    "location": f"$message.payload#/{PARAMETER}",
                }
            },
        },
    }


def _requests(
    wirings: Mapping[Mode, Topology], channels: JSON, operations: JSON
) -> tuple[list[type[msgspec.Struct]], JSON]:
    """The request subjects functions serve, added to ``channels`` and ``operations``; the
    request types and their messages (the request, the answer, a problem)."""
    served = {
        (name, subject): mode
        for mode, topology in wirings.items()
        for name, fn in topology.functions.items()
        for subject in fn.serves
    }
    types: list[type[msgspec.Struct]] = []
    messages: JSON = {}
    for (name, subject), _ in sorted(served.items()):
        request = REQUEST_TYPES[subject]
        types.append(request)
        channel, reply = _channel_id(subject), f"{_channel_id(subject)}.reply"
        answers = {f"{subject}.answer": CancelAnswer, f"{subject}.problem": Problem}
        messages[subject] = _plain_message(subject, request) | {
            "correlationId": {"$ref": f"#/components/correlationIds/{PARAMETER}"}
        }
        messages |= {key: _plain_message(key, cls) for key, cls in answers.items()}
        channels[channel] = {
            "address": subject,
            "description": "A NATS request (not stored): answered at once on its reply subject.",
            "messages": {subject: {"$ref": f"#/components/messages/{subject}"}},
        }
        channels[reply] = {
            "address": None,  # the requester's own inbox
            "description": f"The answer to {subject}, on the request's reply subject.",
            "messages": {k: {"$ref": f"#/components/messages/{k}"} for k in answers},
        }
        modes = sorted(mode for (n, s), mode in served.items() if (n, s) == (name, subject))
        the_reply = {
            "channel": {"$ref": f"#/channels/{reply}"},
            "messages": [{"$ref": f"#/channels/{reply}/messages/{k}"} for k in answers],
        }
        for actor, action in ((name, "receive"), (CLIENT, "send")):
            verb = "answers" if action == "receive" else "asks"
            operations[f"{actor}.{action}.{channel}"] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{channel}"},
                "summary": f"{actor} {verb} {subject}",
                "messages": [{"$ref": f"#/channels/{channel}/messages/{subject}"}],
                "reply": the_reply,
                "tags": [{"name": mode} for mode in ("choreography", "orchestration")]
                if modes
                else [],
            }
    return types, messages


def _plain_message(name: str, cls: type) -> JSON:
    """A message that is not an event: no headers, no version."""
    return {
        "name": name,
        "title": cls.__name__,
        "summary": _doc_of(cls),
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{cls.__name__}"},
    }


def _doc_of(cls: type) -> str:
    return (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")


def event_schema(cls: type[Event]) -> JSON:
    """The standalone JSON Schema (2020-12) of one event, as readers take it."""
    top = msgspec.json.schema(cls)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": subject_of(cls),
        VERSION_KEY: cls.schema_version,
        "$ref": top["$ref"],
        "$defs": {name: _reading(schema) for name, schema in top["$defs"].items()},
    }


def render(value: JSON) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def files(wirings: Mapping[Mode, Topology]) -> dict[str, str]:
    """Every file of the contract, by its path under the contract's directory."""
    out = {DOCUMENT: render(document(wirings))}
    for kind, cls in EVENT_TYPES.items():
        out[f"{SCHEMAS}/{kind}.json"] = render(event_schema(cls))
    return out


def write(directory: Path, wirings: Mapping[Mode, Topology]) -> list[Path]:
    """Write the contract under ``directory``; a schema of a kind that is gone goes too."""
    wanted = files(wirings)
    (directory / SCHEMAS).mkdir(parents=True, exist_ok=True)
    for stale in (directory / SCHEMAS).glob("*.json"):
        if f"{SCHEMAS}/{stale.name}" not in wanted:
            stale.unlink()
    written = []
    for name, text in wanted.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def load(path: Path) -> JSON:
    """A contract document from a file (``ValueError`` if it is not one)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(doc, dict) or not str(doc.get("asyncapi", "")).startswith("3."):
        raise ValueError(f"{path}: not an AsyncAPI 3 document")
    return doc
