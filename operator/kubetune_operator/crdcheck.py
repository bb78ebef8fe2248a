"""Check generated CRD schemas against the API server's structural-schema rules.

The rules are those of apiextensions.k8s.io/v1 ("Specifying a structural schema" in the
Kubernetes documentation, and the CEL estimated-cost limits of "Validation rules"); without
this check a bad schema is only discovered when `kubectl apply -f crds/` fails on a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import celpy
from celpy.celparser import CELParseError

# JSONSchemaProps fields the API server accepts in a CRD schema (apiextensions/v1 types.go),
# minus those it rejects for CRDs ($ref, id, $schema, definitions, dependencies,
# patternProperties, additionalItems) and those we never want (uniqueItems, title).
ALLOWED_KEYS = frozenset(
    {
        "type",
        "description",
        "format",
        "default",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "maxLength",
        "minLength",
        "pattern",
        "maxItems",
        "minItems",
        "multipleOf",
        "enum",
        "maxProperties",
        "minProperties",
        "required",
        "items",
        "properties",
        "additionalProperties",
        "nullable",
        "example",
        "externalDocs",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-embedded-resource",
        "x-kubernetes-int-or-string",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-list-type",
        "x-kubernetes-map-type",
        "x-kubernetes-validations",
    }
)
TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean"})
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def _walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{*}}")


def _node_violations(path: str, node: dict[str, Any]) -> Iterator[str]:
    for key in node:
        if key not in ALLOWED_KEYS:
            yield f"{path}: key {key!r} is not allowed in a CRD schema"
    free = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
        "x-kubernetes-int-or-string"
    )
    kind = node.get("type")
    if kind not in TYPES and not free:
        yield f"{path}: every node needs a type, got {kind!r}"
    if "properties" in node and "additionalProperties" in node:
        yield f"{path}: properties and additionalProperties are mutually exclusive"
    if "additionalProperties" in node and not isinstance(node["additionalProperties"], dict):
        yield f"{path}: additionalProperties must be a schema, not a boolean"
    if kind == "array" and not isinstance(node.get("items"), dict):
        yield f"{path}: an array needs one items schema"
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            yield f"{path}: {bound} must be a boolean in OpenAPI v3.0"
    for req in node.get("required", []):
        if req not in node.get("properties", {}):
            yield f"{path}: required field {req!r} is not a property"
    if "default" in node and kind in _JSON_TYPES:
        value = node["default"]
        if not isinstance(value, _JSON_TYPES[kind]) or (
            kind in ("integer", "number") and isinstance(value, bool)
        ):
            yield f"{path}: default {value!r} is not of type {kind}"
        if "enum" in node and value not in node["enum"]:
            yield f"{path}: default {value!r} is not one of the enum"
    if node.get("x-kubernetes-list-type") == "map":
        items = node.get("items", {})
        for key in node.get("x-kubernetes-list-map-keys", []):
            if key not in items.get("required", []) and "default" not in items.get(
                "properties", {}
            ).get(key, {}):
                yield f"{path}: list-map key {key!r} must be required or defaulted in items"
    # Bounded sizes keep the CEL estimated cost under the API server's limit (a rule comparing
    # or iterating unbounded values makes the whole CRD be rejected at install time).
    if path.startswith(".spec"):
        if kind == "string" and "maxLength" not in node and "enum" not in node:
            yield f"{path}: a spec string needs maxLength (CEL cost estimation)"
        if kind == "array" and "maxItems" not in node:
            yield f"{path}: a spec array needs maxItems (CEL cost estimation)"
        if kind == "object" and "additionalProperties" in node and "maxProperties" not in node:
            yield f"{path}: a spec map needs maxProperties (CEL cost estimation)"


def structural_violations(schema: dict[str, Any]) -> list[str]:
    """Every way ``schema`` (an ``openAPIV3Schema``) breaks the structural-schema rules.

    Returns:
        Human-readable violations, each starting with the JSON path of the node
        (``.spec.dataset.train.uri``); empty when the schema is structural.
    """
    problems: list[str] = []
    env = celpy.Environment()
    metadata = schema.get("properties", {}).get("metadata", {})
    if set(metadata.get("properties", {})) - {"name", "generateName"}:
        problems.append(".metadata: only name and generateName may be restricted")
    for path, node in _walk(schema, ""):
        problems.extend(_node_violations(path, node))
        for rule in node.get("x-kubernetes-validations", []):
            if not {"rule", "message"} <= set(rule):
                problems.append(f"{path}: a validation needs rule and message")
                continue
            try:
                env.compile(rule["rule"])
            except CELParseError as exc:
                problems.append(f"{path}: CEL rule does not parse: {rule['rule']!r}: {exc}")
    return problems
