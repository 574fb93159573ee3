"""Strict writers, checked: what a payload holds that its schema does not list, or lacks that it
requires, against the contract's own JSON Schemas (the subset msgspec writes: objects,
arrays, ``anyOf`` for optional values, ``$ref``)."""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]


def _resolve(schema: JSON, components: JSON) -> JSON:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = components[name]
    return schema


_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
    "boolean": bool, "null": type(None),
}  # fmt: skip


def off_contract(value: object, schema: JSON, components: JSON, path: str = "$") -> list[str]:
    """Every path in ``value`` the schema does not list, and every required one it lacks."""
    schema = _resolve(schema, components)
    if "anyOf" in schema:
        tries = [off_contract(value, s, components, path) for s in schema["anyOf"]]
        return min(tries, key=len)
    expected = schema.get("type")
    if isinstance(expected, str) and not isinstance(value, _TYPES[expected]):
        return [f"{path}: {type(value).__name__}, the contract says {expected}"]
    if isinstance(value, dict) and "properties" in schema:
        listed = schema["properties"]
        problems = [f"{path}.{key}: not in the contract" for key in value if key not in listed]
        # A writer writes the tag too (readers may do without it).
        required = {*schema.get("required", []), *(["type"] if "type" in listed else [])}
        problems += [f"{path}.{key}: missing" for key in sorted(required) if key not in value]
        for key, item in value.items():
            if key in listed:
                problems += off_contract(item, listed[key], components, f"{path}.{key}")
        return problems
    if isinstance(value, list) and "items" in schema:
        return [
            p
            for i, item in enumerate(value)
            for p in off_contract(item, schema["items"], components, f"{path}[{i}]")
        ]
    return []
