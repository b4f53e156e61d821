"""``response_format`` (``json_object`` / ``json_schema``) by validated-and-retried decoding.

The local backend cannot constrain tokens, so the server asks for JSON in a system
instruction, extracts the first JSON value from the answer, validates it (with
``jsonschema`` when it is installed, else with the small validator below), and retries
with the validation error in the instruction. An answer that never validates is an
error naming ``response_format`` — never a 200 with text that is not what was asked for.

A schema that the validator cannot check (a keyword the small validator does not know,
when ``jsonschema`` is not installed) is refused up front with a 400 naming the keyword.

>>> rule = parse_response_format({"type": "json_object"})
>>> rule.check('Sure: {"a": 1}')
({'a': 1}, None)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.server.schemas import OpenAIError

__all__ = ["JsonRule", "extract_json", "parse_response_format", "validate"]

#: attempts per request (the first + retries with the error in the instruction)
ATTEMPTS = 3

_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "format",
                "readOnly", "writeOnly", "deprecated", "strict"}
_CHECKED = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "minLength",
            "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems",
            "anyOf", "oneOf", "allOf", "pattern", "$ref", "$defs", "definitions"}
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _bad(message: str) -> OpenAIError:
    return OpenAIError(400, f"response_format: {message}", param="response_format", code="invalid_response_format")


def _jsonschema() -> Any:
    try:
        import jsonschema
    except ImportError:
        return None
    return jsonschema


def _unknown_keywords(schema: Any, where: str = "schema") -> list[str]:
    """Keywords the small validator would ignore (so it must refuse the schema instead)."""
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, dict):
        raise _bad(f"{where} must be an object, got {type(schema).__name__}")
    out = [f"{where}.{k}" for k in schema if k not in _CHECKED | _ANNOTATIONS]
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            out += _unknown_keywords(sub, f"{where}.{key}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out += _unknown_keywords(schema[key], f"{where}.{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key) or []):
            out += _unknown_keywords(sub, f"{where}.{key}[{i}]")
    return out


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    if not ref.startswith("#/"):
        raise _bad(f"$ref {ref!r}: only local references (#/...) are supported")
    node: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(node, dict) or part not in node:
            raise _bad(f"$ref {ref!r} does not resolve")
        node = node[part]
    return node


def _check(value: Any, schema: Any, root: dict[str, Any], path: str) -> str | None:
    """The first violation of ``schema`` by ``value`` (None if it conforms). The small validator."""
    if schema is True or schema == {}:
        return None
    if schema is False:
        return f"{path}: not allowed"
    if "$ref" in schema:
        return _check(value, _resolve(schema["$ref"], root), root, path)
    t = schema.get("type")
    if t is not None:
        kinds = t if isinstance(t, list) else [t]
        if not any(_TYPES.get(k, lambda v: False)(value) for k in kinds):
            return f"{path}: expected {' or '.join(kinds)}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: {value!r} is not one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{path}: must be {schema['const']!r}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            return f"{path}: string length {len(value)} out of range"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return f"{path}: does not match {schema['pattern']!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            return f"{path}: {value} out of range"
        if value <= schema.get("exclusiveMinimum", -math.inf) or value >= schema.get("exclusiveMaximum", math.inf):
            return f"{path}: {value} out of range"
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            return f"{path}: {len(value)} items out of range"
        if isinstance(schema.get("items"), (dict, bool)):
            for i, item in enumerate(value):
                err = _check(item, schema["items"], root, f"{path}[{i}]")
                if err:
                    return err
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                return f"{path}: missing required property {name!r}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            sub = props.get(name, extra)
            if sub is False:
                return f"{path}: unexpected property {name!r}"
            err = _check(item, sub, root, f"{path}.{name}")
            if err:
                return err
    for sub in schema.get("allOf", []):
        err = _check(value, sub, root, path)
        if err:
            return err
    if "anyOf" in schema and all(_check(value, s, root, path) for s in schema["anyOf"]):
        return f"{path}: matches none of anyOf"
    if "oneOf" in schema and sum(_check(value, s, root, path) is None for s in schema["oneOf"]) != 1:
        return f"{path}: must match exactly one of oneOf"
    return None


def validate(value: Any, schema: dict[str, Any]) -> str | None:
    """The first way ``value`` violates ``schema``, or None. Uses ``jsonschema`` when installed."""
    js = _jsonschema()
    if js is not None:
        err = next(iter(js.Draft202012Validator(schema).iter_errors(value)), None)
        if err is None:
            return None
        where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        return f"{where}: {err.message}"
    try:
        return _check(value, schema, schema, "$")
    except (TypeError, KeyError, ValueError, AttributeError, re.error) as exc:
        raise _bad(f"json_schema.schema is malformed: {type(exc).__name__}: {exc}") from exc


def extract_json(text: str) -> tuple[Any, str | None]:
    """The first JSON object or array in ``text`` (code fences and chatter around it allowed)."""
    dec = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[\[{]", text)]
    if not starts:
        return None, "the answer contains no JSON object"
    first_err = None
    for i in starts:
        try:
            value, _ = dec.raw_decode(text, i)
            return value, None
        except json.JSONDecodeError as exc:
            first_err = first_err or f"not valid JSON ({exc.msg} at character {exc.pos})"
    return None, first_err


@dataclass(frozen=True)
class JsonRule:
    """What the answer must be: any JSON object, or a value matching ``schema``."""

    kind: str  # "json_object" | "json_schema"
    schema: dict[str, Any] | None = None
    name: str | None = None

    def instruction(self, error: str | None = None) -> str:
        if self.schema is not None:
            text = ("Reply with only a JSON value that matches this JSON Schema, with no other text:\n"
                    + json.dumps(self.schema, ensure_ascii=False))
        else:
            text = "Reply with only a JSON object, with no other text."
        if error:
            text += f"\nYour previous reply was rejected: {error}. Reply with valid JSON only."
        return text

    def prime(self, messages: list[dict[str, str]], error: str | None = None) -> list[dict[str, str]]:
        """The messages with the JSON instruction added to (or as) the system turn."""
        note = self.instruction(error)
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": messages[0]["content"] + "\n\n" + note}, *messages[1:]]
        return [{"role": "system", "content": note}, *messages]

    def check(self, text: str) -> tuple[Any, str | None]:
        value, err = extract_json(text)
        if err is not None:
            return None, err
        if self.schema is None:
            return (value, None) if isinstance(value, dict) else (None, "the answer is JSON but not an object")
        bad = validate(value, self.schema)
        return (value, None) if bad is None else (None, f"does not match the schema: {bad}")


def parse_response_format(rf: dict[str, Any] | None) -> JsonRule | None:
    """``response_format`` → a rule (None for text); 400 for what cannot be honoured."""
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonRule("json_object")
    if kind != "json_schema":
        raise _bad(f"type {kind!r} is not supported; use text, json_object or json_schema")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise _bad("json_schema must be an object with a 'schema' object")
    schema = spec.get("schema") or {"type": "object"}
    js = _jsonschema()
    if js is not None:
        try:
            js.Draft202012Validator.check_schema(schema)
        except js.SchemaError as exc:
            raise _bad(f"json_schema.schema is not a valid JSON Schema: {exc.message}") from exc
    else:
        unknown = _unknown_keywords(schema)
        if unknown:
            raise _bad(f"cannot check keyword(s) {', '.join(unknown[:5])} (install jsonschema for full JSON "
                       "Schema support)")
    return JsonRule("json_schema", schema=schema, name=spec.get("name"))
