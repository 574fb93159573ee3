"""Can two versions of the contract work side by side? Every breaking change, named by its path.

``runner.py contract --check OLD.json`` compares the contract the code generates now with
an older document (in CI, the one committed in ``contract/``), message by message, both ways
a rolling deploy needs:

* **backward**: the new readers read everything the old writers wrote (events already in
  the log, and what old processes still write during the deploy). A message whose schema
  version went up is covered by the upcasters, if the new contract still reads the old
  version; otherwise the old writer's schema must fit the new reader's;
* **forward**: the old readers read what the new writers write (old processes still run
  during the deploy). The new writer's schema must fit the old reader's, whatever the version.

A writer's schema *fits* a reader's when everything the one allows, the other accepts (on
the readers' JSON Schemas the contract publishes, ``$ref`` resolved): no property the reader
requires that the writer may leave out, none the writer writes if the reader refuses unknown
properties, the same types (an integer is a number), bounds (lengths, item counts, minimum
and maximum) no tighter for the reader, enum values no fewer, a pattern unchanged. A message
or channel that is gone breaks both ways; added ones, and changes of who sends or receives
what, break neither. Everything else is listed as compatible.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from orderflow.runtime.context import SCHEMA_VERSION
from orderflow.tools.contract import VERSION_KEY

JSON = dict[str, Any]
Breaks = Literal["backward", "forward", "both"]

#: Bounds a reader may not make tighter than its writer's: (key, is a lower bound).
_BOUNDS = [
    ("minLength", True), ("maxLength", False), ("minItems", True), ("maxItems", False),
    ("minimum", True), ("maximum", False), ("exclusiveMinimum", True),
    ("exclusiveMaximum", False),
]  # fmt: skip


@dataclass(frozen=True)
class Change:
    where: str  # a message and a path in its payload (``delivery.scheduled $.carrier``), a channel
    what: str
    breaks: Breaks | None = None  # None: compatible


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)

    @property
    def breaking(self) -> list[Change]:
        return [c for c in self.changes if c.breaks is not None]

    @property
    def backward(self) -> bool:
        """Whether the new readers read everything the old writers wrote."""
        return not any(c.breaks in ("backward", "both") for c in self.changes)

    @property
    def forward(self) -> bool:
        """Whether the old readers read everything the new writers write."""
        return not any(c.breaks in ("forward", "both") for c in self.changes)

    @property
    def ok(self) -> bool:
        return not self.breaking

    def render(self, against: str) -> str:
        def yes(ok: bool) -> str:
            return "yes" if ok else "NO"

        lines = [
            f"contract compared with {against}:",
            f"  the new readers read what the old writers wrote (backward): {yes(self.backward)}",
            f"  the old readers read what the new writers write (forward): {yes(self.forward)}",
        ]
        if self.breaking:
            lines.append(f"{len(self.breaking)} breaking:")
            lines += [f"  {c.breaks}: {c.where}: {c.what}" for c in self.breaking]
        compatible = [c for c in self.changes if c.breaks is None]
        if compatible:
            lines.append(f"{len(compatible)} compatible:")
            lines += [f"  {c.where}: {c.what}" for c in compatible]
        if not self.changes:
            lines.append("no change")
        return "\n".join(lines)


def compare(old: JSON, new: JSON) -> Report:
    """What changed from the ``old`` contract document to the ``new`` one, and what breaks."""
    report = Report()
    old_messages, new_messages = _messages(old), _messages(new)
    for kind, message in old_messages.items():
        if kind not in new_messages:
            report.changes.append(
                Change(kind, "message removed: nothing reads what old writers wrote", "both")
            )
            continue
        report.changes += _message(kind, (old, message), (new, new_messages[kind]))
    report.changes += [Change(kind, "message added") for kind in new_messages.keys() - old_messages]
    report.changes += _channels(old, new)
    old_ops, new_ops = set(old.get("operations", {})), set(new.get("operations", {}))
    report.changes += [Change(f"operation {op}", "removed") for op in sorted(old_ops - new_ops)]
    report.changes += [Change(f"operation {op}", "added") for op in sorted(new_ops - old_ops)]
    return report


def _messages(doc: JSON) -> dict[str, JSON]:
    messages = doc.get("components", {}).get("messages", {})
    return {kind: _resolve(doc, m) for kind, m in messages.items()}


def _version(message: JSON) -> int:
    return int(message.get(VERSION_KEY, 1))


def _versions_read(message: JSON) -> set[int]:
    header = message.get("headers", {}).get("properties", {}).get(SCHEMA_VERSION, {})
    return {int(v) for v in header.get("enum", ["1"])}


Side = tuple[JSON, JSON]  # (the document, a schema in it)


def _message(kind: str, old: Side, new: Side) -> list[Change]:
    (old_doc, old_message), (new_doc, new_message) = old, new
    old_payload, new_payload = old_message["payload"], new_message["payload"]
    changes = [
        Change(f"{kind} {path}", what, "forward")
        for path, what in _refuses((new_doc, new_payload), (old_doc, old_payload), "$")
    ]
    before, now = _version(old_message), _version(new_message)
    if now > before and before in _versions_read(new_message):
        changes.append(
            Change(
                kind,
                f"schema version {before} -> {now}: what old writers wrote is upgraded by the "
                "upcasters",
            )
        )
        grown = sorted(_paths(new_doc, new_payload) - _paths(old_doc, old_payload))
        changes += [Change(f"{kind} {path}", f"added in version {now}") for path in grown]
    elif now > before:
        changes.append(
            Change(
                kind, f"schema version {before} -> {now}, and {before} is read no more", "backward"
            )
        )
    elif now < before:
        changes.append(Change(kind, f"schema version back from {before} to {now}", "backward"))
    else:
        changes += [
            Change(f"{kind} {path}", what, "backward")
            for path, what in _refuses((old_doc, old_payload), (new_doc, new_payload), "$")
        ]
    if not changes and _resolved(old_doc, old_payload) != _resolved(new_doc, new_payload):
        before_paths, now_paths = _paths(old_doc, old_payload), _paths(new_doc, new_payload)
        added, removed = sorted(now_paths - before_paths), sorted(before_paths - now_paths)
        changes += [Change(f"{kind} {path}", "added, optional") for path in added]
        changes += [Change(f"{kind} {path}", "no longer written") for path in removed]
        if not added and not removed:
            changes.append(Change(kind, "payload schema changed, compatibly"))
    return changes


def _paths(doc: JSON, schema: JSON, path: str = "$", depth: int = 0) -> set[str]:
    """The path of every property ``schema`` lists, nested ones included."""
    schema = _resolve(doc, schema)
    if depth > 32:
        return set()
    found: set[str] = set()
    for alternative in schema.get("anyOf", []):
        found |= _paths(doc, alternative, path, depth + 1)
    if "items" in schema:
        found |= _paths(doc, schema["items"], f"{path}[*]", depth + 1)
    for name, inner in schema.get("properties", {}).items():
        found |= {f"{path}.{name}"} | _paths(doc, inner, f"{path}.{name}", depth + 1)
    return found


def _channels(old: JSON, new: JSON) -> list[Change]:
    def by_address(doc: JSON) -> dict[str, set[str]]:
        # A reply channel has no address of its own (the requester's inbox): it goes
        # with its request, whose messages are compared like every other.
        return {
            channel["address"]: set(channel.get("messages", {}))
            for channel in (_resolve(doc, c) for c in doc.get("channels", {}).values())
            if channel.get("address") is not None
        }

    before, now = by_address(old), by_address(new)
    changes = []
    for address, kinds in before.items():
        if address not in now:
            changes.append(
                Change(
                    f"channel {address}",
                    "removed: old writers publish there, old readers listen there",
                    "both",
                )
            )
            continue
        changes += [
            Change(f"channel {address}", f"{kind} no longer travels on it", "both")
            for kind in sorted(kinds - now[address])
        ]
        changes += [
            Change(f"channel {address}", f"{kind} added") for kind in sorted(now[address] - kinds)
        ]
    changes += [Change(f"channel {address}", "added") for address in sorted(now.keys() - before)]
    return changes


# --- schemas ---------------------------------------------------------------------


def _resolve(doc: JSON, schema: JSON) -> JSON:
    """``schema`` with a local ``$ref`` followed (``#/components/schemas/X``)."""
    seen = 0
    while "$ref" in schema:
        seen += 1
        if seen > 32:
            raise ValueError(f"a $ref cycle at {schema['$ref']}")
        target: Any = doc
        for token in schema["$ref"].removeprefix("#/").split("/"):
            target = target[token.replace("~1", "/").replace("~0", "~")]
        schema = target
    return schema


def _resolved(doc: JSON, schema: Any, depth: int = 0) -> Any:
    """``schema`` with every ``$ref`` in it replaced by what it names (for comparing)."""
    if depth > 32:
        return schema
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _resolved(doc, _resolve(doc, schema), depth + 1)
        return {k: _resolved(doc, v, depth + 1) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_resolved(doc, v, depth + 1) for v in schema]
    return schema


def _kind(schema: JSON) -> str | None:
    given = schema.get("type")
    if isinstance(given, str):
        return given
    return "enum" if "enum" in schema or "const" in schema else None


def _values(schema: JSON) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    values = schema.get("enum")
    return list(values) if isinstance(values, list) else None


def _refuses(writer: Side, reader: Side, path: str) -> list[tuple[str, str]]:
    """What the writer's schema allows that the reader's refuses: (path, why) each."""
    return list(_walk(writer, reader, path, 0))


def _walk(writer: Side, reader: Side, path: str, depth: int) -> Iterator[tuple[str, str]]:
    (wdoc, w), (rdoc, r) = writer, reader
    w, r = _resolve(wdoc, w), _resolve(rdoc, r)
    if depth > 64:
        return
    if "anyOf" in w:  # every alternative a writer may write must be readable
        for alternative in w["anyOf"]:
            yield from _walk((wdoc, alternative), (rdoc, r), path, depth + 1)
        return
    if "anyOf" in r:  # some alternative of the reader's must take it
        tries = [list(_walk((wdoc, w), (rdoc, alt), path, depth + 1)) for alt in r["anyOf"]]
        yield from min(tries, key=len)
        return
    wkind, rkind = _kind(w), _kind(r)
    values = _values(r)
    if values is not None:
        written = _values(w)
        if written is None:
            yield path, f"readers take only {_show(values)}, writers are not held to them"
        elif extra := [v for v in written if v not in values]:
            yield path, f"{_show(extra)} may be written, readers take only {_show(values)}"
        return
    if rkind is None or wkind == "enum":
        return  # the reader takes anything; or the writer keeps to a few values of its type
    if wkind != rkind and not (wkind == "integer" and rkind == "number"):
        yield path, f"written as {wkind or 'anything'}, read as {rkind}"
        return
    for key, lower in _BOUNDS:
        bound, allowed = r.get(key), w.get(key)
        if bound is None:
            continue
        if allowed is None:
            yield path, f"readers take {key} {bound}, writers are not bounded"
        elif (bound > allowed) if lower else (bound < allowed):
            yield path, f"readers take {key} {bound}, writers may write {key} {allowed}"
    if "pattern" in r and r["pattern"] != w.get("pattern"):
        kept = w.get("pattern", "none")
        yield path, f"readers take only the pattern {r['pattern']}, writers keep to {kept}"
    if rkind == "object":
        yield from _object((wdoc, w), (rdoc, r), path, depth)
    elif rkind == "array" and "items" in r:
        yield from _walk((wdoc, w.get("items", {})), (rdoc, r["items"]), f"{path}[*]", depth + 1)


def _object(writer: Side, reader: Side, path: str, depth: int) -> Iterator[tuple[str, str]]:
    (wdoc, w), (rdoc, r) = writer, reader
    wprops, rprops = w.get("properties", {}), r.get("properties", {})
    wrequired = set(w.get("required", []))
    for name in r.get("required", []):
        if name not in wrequired:
            how = "may leave it out" if name in wprops else "never write it"
            yield f"{path}.{name}", f"required by readers, and writers {how}"
    if r.get("additionalProperties") is False:
        for name in wprops:
            if name not in rprops:
                yield (
                    f"{path}.{name}",
                    "writers write it, and readers refuse properties they do not know",
                )
    for name, schema in wprops.items():
        if name in rprops:
            yield from _walk((wdoc, schema), (rdoc, rprops[name]), f"{path}.{name}", depth + 1)
    if isinstance(r.get("additionalProperties"), dict):  # a map: its values
        values = w.get("additionalProperties", {})
        values = values if isinstance(values, dict) else {}
        yield from _walk((wdoc, values), (rdoc, r["additionalProperties"]), f"{path}.*", depth + 1)


def _show(values: list[Any]) -> str:
    return ", ".join(repr(v) for v in values)
