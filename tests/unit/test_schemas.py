"""The committed JSON Schema snapshot guards events already in the log.

A change is backward compatible when every event written under the old schema still
validates under the new one: no field removed or retyped, no new required field.
Regenerate the snapshot (`conveyor schemas > schemas/events.json`) only for
compatible changes; a breaking change needs a new schema version instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conveyor.payloads import json_schemas

SNAPSHOT = Path(__file__).parents[2] / "schemas" / "events.json"


def breaking_changes(old: dict[str, Any], new: dict[str, Any], where: str = "") -> list[str]:
    problems: list[str] = []
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name in old_props:
        if name not in new_props:
            problems.append(f"{where}{name}: removed")
        elif not _accepts_as_before(old_props[name], new_props[name]):
            problems.append(f"{where}{name}: type changed")
    for name in set(new.get("required", [])) - set(old.get("required", [])):
        problems.append(f"{where}{name}: newly required")
    for name, sub in old.get("$defs", {}).items():
        problems += breaking_changes(sub, new.get("$defs", {}).get(name, {}), f"{where}{name}.")
    return problems


def _shape(prop: dict[str, Any]) -> Any:
    return {k: prop[k] for k in ("type", "$ref", "anyOf", "items", "enum") if k in prop}


def _accepts_as_before(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``new`` takes every value ``old`` took: the same shape, but an enum may grow."""
    if "enum" in old and "enum" in new:
        rest = ("type", "$ref", "anyOf", "items")
        same = all(old.get(k) == new.get(k) for k in rest)
        return same and set(map(json.dumps, old["enum"])) <= set(map(json.dumps, new["enum"]))
    if "anyOf" in old and "anyOf" in new and len(old["anyOf"]) == len(new["anyOf"]):
        return all(_accepts_as_before(o, n) for o, n in zip(old["anyOf"], new["anyOf"], strict=True))
    return bool(_shape(old) == _shape(new))


def check(snapshot: dict[str, Any], current: dict[str, Any]) -> list[str]:
    problems = []
    for event_type, versions in snapshot.items():
        for version, schema in versions.items():
            if version not in current.get(event_type, {}):
                problems.append(f"{event_type} {version}: schema removed")
                continue
            found = breaking_changes(schema, current[event_type][version])
            problems += [f"{event_type} {version}: {p}" for p in found]
    return problems


def test_current_schemas_are_backward_compatible_with_the_snapshot() -> None:
    snapshot = json.loads(SNAPSHOT.read_text())
    assert check(snapshot, json_schemas()) == []


def test_every_current_schema_is_in_the_snapshot() -> None:
    snapshot = json.loads(SNAPSHOT.read_text())
    current = json_schemas()
    missing = [f"{t} {v}" for t, vs in current.items() for v in vs if v not in snapshot.get(t, {})]
    assert missing == [], "run: conveyor schemas > schemas/events.json"


def test_the_checker_catches_breaking_changes() -> None:
    old = {"properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"]}
    assert check({"t": {"v1": old}}, {"t": {"v1": old}}) == []
    retyped = {"properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"]}
    removed = {"properties": {"a": {"type": "string"}}, "required": ["a"]}
    required = {"properties": old["properties"], "required": ["a", "b"]}
    assert check({"t": {"v1": old}}, {"t": {"v1": retyped}}) == ["t v1: a: type changed"]
    assert check({"t": {"v1": old}}, {"t": {"v1": removed}}) == ["t v1: b: removed"]
    assert check({"t": {"v1": old}}, {"t": {"v1": required}}) == ["t v1: b: newly required"]
    assert check({"t": {"v1": old}}, {}) == ["t v1: schema removed"]
    # A value more allowed is compatible (old events still validate); a value less is not.
    kinds = {"properties": {"k": {"anyOf": [{"enum": ["x", "y"], "type": "string"}, {"type": "null"}]}}}
    more = {"properties": {"k": {"anyOf": [{"enum": ["x", "y", "z"], "type": "string"}, {"type": "null"}]}}}
    fewer = {"properties": {"k": {"anyOf": [{"enum": ["x"], "type": "string"}, {"type": "null"}]}}}
    assert check({"t": {"v1": kinds}}, {"t": {"v1": more}}) == []
    assert check({"t": {"v1": kinds}}, {"t": {"v1": fewer}}) == ["t v1: k: type changed"]
