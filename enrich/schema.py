"""The attribute schema: the JSON schema given to vLLM's structured outputs, its validator, and its Arrow types.

One schema for every domain (so the Arrow columns are the same everywhere); the per-domain wording lives in
the prompt templates. The validator implements exactly the JSON-schema keywords used here, so the job checks
every generated object itself instead of trusting the constrained decoder (a truncated generation, for
example, satisfies the grammar's prefix but is not a complete object).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "attributes-v1"
PRICE_TIERS = ("budget", "mid-range", "premium", "unknown")

# Field order is the column order of attributes.arrow and the order in which attributes are rendered for
# the embedding text. Lengths are bounded so a complete object always fits the default token budget.
ATTRIBUTE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "minLength": 1, "maxLength": 48},
        "themes": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 32},
                   "minItems": 1, "maxItems": 3},
        "usage_context": {"type": "string", "minLength": 1, "maxLength": 64},
        "audience": {"type": "string", "minLength": 1, "maxLength": 48},
        "related_interests": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 32},
                              "minItems": 1, "maxItems": 3},
        "price_tier": {"type": "string", "enum": list(PRICE_TIERS)},
    },
    "required": ["category", "themes", "usage_context", "audience", "related_interests", "price_tier"],
    "additionalProperties": False,
}
FIELDS: tuple[str, ...] = tuple(ATTRIBUTE_SCHEMA["properties"])


def arrow_type(spec: dict[str, Any]) -> pa.DataType:
    """The Arrow type of one schema property (string or list<string>)."""
    if spec["type"] == "string":
        return pa.string()
    if spec["type"] == "array" and spec["items"]["type"] == "string":
        return pa.list_(pa.string())
    raise ValueError(f"unsupported schema property type {spec['type']!r}")


def arrow_fields(schema: dict[str, Any] = ATTRIBUTE_SCHEMA) -> list[pa.Field]:
    """One nullable Arrow field per schema property (null when the item has no valid attributes)."""
    return [pa.field(name, arrow_type(spec), nullable=True) for name, spec in schema["properties"].items()]


def _check(value: Any, spec: dict[str, Any], where: str, errors: list[str]) -> None:
    kind = spec.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            errors.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        props = spec.get("properties", {})
        for name in spec.get("required", []):
            if name not in value:
                errors.append(f"{where}: missing field {name!r}")
        if spec.get("additionalProperties", True) is False:
            for name in value:
                if name not in props:
                    errors.append(f"{where}: unexpected field {name!r}")
        for name, sub in props.items():
            if name in value:
                _check(value[name], sub, f"{where}.{name}", errors)
    elif kind == "string":
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {type(value).__name__}")
            return
        if "enum" in spec and value not in spec["enum"]:
            errors.append(f"{where}: {value!r} is not one of {spec['enum']}")
        if len(value.strip()) < spec.get("minLength", 0):
            errors.append(f"{where}: shorter than {spec['minLength']} characters (blank)")
        if "maxLength" in spec and len(value) > spec["maxLength"]:
            errors.append(f"{where}: longer than {spec['maxLength']} characters")
    elif kind == "array":
        if not isinstance(value, list):
            errors.append(f"{where}: expected an array, got {type(value).__name__}")
            return
        if len(value) < spec.get("minItems", 0):
            errors.append(f"{where}: fewer than {spec['minItems']} items")
        if "maxItems" in spec and len(value) > spec["maxItems"]:
            errors.append(f"{where}: more than {spec['maxItems']} items")
        for i, item in enumerate(value):
            _check(item, spec["items"], f"{where}[{i}]", errors)
    else:
        raise ValueError(f"unsupported schema type {kind!r} at {where}")


def validate(obj: Any, schema: dict[str, Any] = ATTRIBUTE_SCHEMA) -> list[str]:
    """Errors of `obj` against `schema` (empty list when valid)."""
    errors: list[str] = []
    _check(obj, schema, "$", errors)
    return errors


def parse(text: str, schema: dict[str, Any] = ATTRIBUTE_SCHEMA) -> tuple[dict[str, Any] | None, str | None]:
    """Parses one generated text: (attributes, None) when it is a schema-valid JSON object, else (None, why)."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        return None, f"not JSON ({exc.msg if isinstance(exc, json.JSONDecodeError) else exc})"
    errors = validate(obj, schema)
    if errors:
        return None, "; ".join(errors[:3])
    return obj, None


def schema_json(schema: dict[str, Any] = ATTRIBUTE_SCHEMA) -> str:
    """Canonical JSON text of the schema (part of the prompt version hash)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))
