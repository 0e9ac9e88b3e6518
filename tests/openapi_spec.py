"""Validate JSON bodies against OpenAI's published OpenAPI document (OpenAPI 3.1, JSON Schema 2020-12).

The document lies beside the repository, at ../shared/openai-openapi.yaml. It is loaded once, and its
OpenAPI 3.0 leftovers are rewritten into JSON Schema 2020-12 before use:

- `nullable: true` (111 schemas, e.g. a stream chunk's `finish_reason` and `usage`) becomes
  `anyOf: [<the schema>, {type: null}]`; 2020-12 would ignore the keyword and reject the nulls.
- a boolean `exclusiveMinimum` / `exclusiveMaximum` beside `minimum` / `maximum` becomes the number form.
- a `required` list naming a property twice (one schema does) names it once.
- `$recursiveRef: "#"` under a `$recursiveAnchor` (draft 2019-09) becomes a `$ref` to the anchoring schema;
  "#" alone would point at the document's root.

`discriminator`, `x-*`, `example(s)`, `deprecated` and the custom `format: unixtime` are annotations that
jsonschema ignores; known formats (`date`, `uri`, ...) are checked.

    validate_response("/v1/chat/completions", "post", 200, body)       # the schema the spec's paths name
    validate_stream("/v1/chat/completions", "post", sse_text)          # each `data:` chunk, then [DONE]
    validate_events("/v1/responses", "post", sse_text)                 # each named event by its type
    validate_error(body)                                               # ErrorResponse, any path
    validate(body, "CreateChatCompletionResponse")                     # a named component schema
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "openai-openapi.yaml"
SPEC_URI = "urn:openai-openapi"
ERROR_SCHEMA = "ErrorResponse"


class SpecViolation(AssertionError):
    """A body that does not validate; the message lists each error at its JSON path."""


# -- loading and normalizing ----------------------------------------------------------------------
def _normalize(node):
    """The OpenAPI 3.0 keywords in `node` (a schema, or any part of the document) as JSON Schema 2020-12."""
    if isinstance(node, list):
        return [_normalize(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _normalize(value) for key, value in node.items()}
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(exclusive), bool) and node.pop(exclusive) and bound in node:
            node[exclusive] = node.pop(bound)
    required = node.get("required")
    if isinstance(required, list) and len(set(map(str, required))) < len(required):
        node["required"] = list(dict.fromkeys(required))
    nullable = node.get("nullable")
    if isinstance(nullable, bool):
        del node["nullable"]
        if nullable:
            return {"anyOf": [node, {"type": "null"}]}
    return node


def _resolve_recursive_refs(schema, anchor_ref: str):
    if isinstance(schema, list):
        return [_resolve_recursive_refs(item, anchor_ref) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _resolve_recursive_refs(value, anchor_ref) for key, value in schema.items()}
    if schema.get("$recursiveRef") == "#":
        del schema["$recursiveRef"]
        schema["$ref"] = anchor_ref
    return schema


@functools.cache
def spec() -> dict:
    """The whole document, normalized (see the module docstring). Loaded once per process."""
    if not SPEC_PATH.is_file():
        raise FileNotFoundError(f"OpenAI's OpenAPI document is not at {SPEC_PATH} (../shared/ from the repository)")
    with SPEC_PATH.open("rb") as f:
        document = yaml.load(f, Loader=yaml.CSafeLoader)
    document = _normalize(document)
    schemas = document["components"]["schemas"]
    for name, schema in schemas.items():
        if isinstance(schema, dict) and schema.pop("$recursiveAnchor", False):
            schemas[name] = _resolve_recursive_refs(schema, f"#/components/schemas/{name}")
    return document


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(SPEC_URI, Resource.from_contents(spec(), default_specification=DRAFT202012))


@functools.cache
def _validator(pointer: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"{SPEC_URI}#{pointer}"},
        registry=_registry(),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


def schema_pointer(name: str) -> str:
    """`Name` or `#/components/schemas/Name` -> the JSON pointer into the document (checked to exist)."""
    pointer = name.removeprefix("#") if name.startswith("#/") else f"/components/schemas/{name}"
    node = spec()
    for part in pointer.strip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{pointer} is not in {SPEC_PATH.name}")
        node = node[part]
    return pointer


# -- validating -----------------------------------------------------------------------------------
def _json_path(path) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _describe(error: jsonschema.ValidationError) -> str:
    message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
    line = f"{_json_path(error.absolute_path)}: {message}"
    if error.context:  # anyOf / oneOf: why the branch that got furthest failed (not "is not of type 'null'")
        branches: dict = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        closest = max(branches.values(), key=lambda errs: (max(len(e.absolute_path) for e in errs),
                                                            not any(e.validator == "type" for e in errs)))
        for sub in closest[:3]:
            line += f"\n    closest branch: {_describe(sub)}"
    return line


def _check(validator: jsonschema.Draft202012Validator, body, what: str) -> None:
    errors = sorted(validator.iter_errors(body), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        shown = json.dumps(body, ensure_ascii=False)
        shown = shown if len(shown) <= 2000 else shown[:2000] + "..."
        raise SpecViolation(f"{what}: {len(errors)} error(s)\n" + "\n".join(_describe(e) for e in errors)
                            + f"\nbody: {shown}")


def validate(body, schema: str) -> None:
    """`body` against a component schema (`"Model"` or `"#/components/schemas/Model"`); SpecViolation if not."""
    pointer = schema_pointer(schema)
    _check(_validator(pointer), body, f"not a valid {pointer.rsplit('/', 1)[-1]}")


def validate_error(body) -> None:
    """`body` is OpenAI's one error shape (the ErrorResponse schema), for any path, including unknown ones."""
    validate(body, ERROR_SCHEMA)


# -- which schema the spec's paths name -----------------------------------------------------------
def _spec_path(path: str) -> str:
    """A request path ("/v1/models/m") -> the spec's path template ("/models/{model}")."""
    base = urlparse(spec()["servers"][0]["url"]).path.rstrip("/")  # "/v1"
    if base and (path == base or path.startswith(base + "/")):
        path = path[len(base):]
    paths = spec()["paths"]
    if path in paths:
        return path
    for template in paths:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return template
    raise KeyError(f"{path} is not a path in {SPEC_PATH.name}")


def _resolved(node: dict | None) -> dict | None:
    """A response object, following its `$ref` into `components/responses`."""
    while node is not None and "$ref" in node:
        target = spec()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _response_object(operation: dict, status: int) -> dict | None:
    responses = operation.get("responses", {})
    return _resolved(responses.get(str(status)) or responses.get(f"{status // 100}XX") or responses.get("default"))


def _operation(path: str, method: str) -> tuple[str, dict]:
    template = _spec_path(path)
    operation = spec()["paths"][template].get(method.lower())
    if operation is None:
        raise KeyError(f"{method.upper()} {template} is not an operation in {SPEC_PATH.name}")
    return template, operation


def _error_schema(operation: dict) -> str:
    """The error schema the operation documents (its 4xx/5xx JSON response), else OpenAI's ErrorResponse."""
    for status, response in operation.get("responses", {}).items():
        if status[0] in "45":
            media = _resolved(response).get("content", {}).get("application/json", {})
            if "$ref" in media.get("schema", {}):
                return media["schema"]["$ref"]
    return ERROR_SCHEMA


def response_schema(path: str, method: str, status: int, content_type: str = "application/json") -> str:
    """The `$ref` of the schema that the spec's `paths` give a response (path may carry the /v1 prefix)."""
    template, operation = _operation(path, method)
    response = _response_object(operation, status)
    if response is None:
        if status >= 400:
            return _error_schema(operation)
        raise KeyError(f"{method.upper()} {template} documents no {status} response")
    content = response.get("content", {})
    media = content.get(content_type) or content.get("application/json")
    if media is None or "$ref" not in media.get("schema", {}):
        raise KeyError(f"{method.upper()} {template} {status} has no {content_type} schema")
    return media["schema"]["$ref"]


def validate_response(path: str, method: str, status: int, body) -> None:
    """`body` (parsed JSON) against the schema the spec gives `method path` answering `status`. An error
    status on a path or method the spec does not have (404 for an unknown URL, 405) is an ErrorResponse."""
    try:
        schema = response_schema(path, method, status)
    except KeyError:
        if status < 400:
            raise
        schema = ERROR_SCHEMA
    validate(body, schema)


# -- server-sent events ---------------------------------------------------------------------------
def _relax_finish_reason(schema):
    """A copy of `schema` whose `finish_reason` properties also allow null, with local $refs made absolute."""
    if isinstance(schema, list):
        return [_relax_finish_reason(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _relax_finish_reason(value) for key, value in schema.items()}
    if isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#"):
        schema["$ref"] = SPEC_URI + schema["$ref"]
    properties = schema.get("properties")
    if isinstance(properties, dict) and "finish_reason" in properties:
        properties["finish_reason"] = {"anyOf": [properties["finish_reason"], {"type": "null"}]}
    return schema


@functools.cache
def _chunk_validator(path: str, method: str) -> tuple[jsonschema.Draft202012Validator, str]:
    template, operation = _operation(path, method)
    content = (_response_object(operation, 200) or {}).get("content", {})
    if "text/event-stream" in content:
        pointer = schema_pointer(content["text/event-stream"]["schema"]["$ref"])
        return _validator(pointer), pointer.rsplit("/", 1)[-1]
    # No stream schema: /completions documents "a sequence of completion objects if the request is streamed",
    # i.e. CreateCompletionResponse per chunk. Its `finish_reason` is not nullable there, yet every chunk but
    # the last (OpenAI's own included) carries `finish_reason: null`; that one field is relaxed for chunks.
    pointer = schema_pointer(response_schema(path, method, 200))
    node = spec()
    for part in pointer.strip("/").split("/"):
        node = node[part]
    chunk_schema = _relax_finish_reason(copy.deepcopy(node))
    validator = jsonschema.Draft202012Validator(
        chunk_schema, registry=_registry(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    return validator, f"{pointer.rsplit('/', 1)[-1]} (as a stream chunk)"


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of an event stream, in order (multi-line data joined with newlines)."""
    payloads, lines = [], []
    for line in text.splitlines() + [""]:
        if not line:
            if lines:
                payloads.append("\n".join(lines))
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    return payloads


def validate_stream(path: str, method: str, text: str) -> list[dict]:
    """Each chunk of a streamed 200 response against the spec's stream schema for `method path`; an
    `{"error": ...}` event against the error schema. The stream must end with `data: [DONE]` and hold
    nothing after it. Returns the parsed chunks (error events included)."""
    payloads = sse_data(text)
    if not payloads or payloads[-1] != "[DONE]":
        raise SpecViolation(f"the stream does not end with `data: [DONE]`: {text[-500:]!r}")
    validator, what = _chunk_validator(path, method)
    chunks = []
    for i, payload in enumerate(payloads[:-1]):
        if payload == "[DONE]":
            raise SpecViolation(f"event {i} is [DONE] before the end of the stream")
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise SpecViolation(f"event {i} is not JSON ({exc}): {payload[:500]!r}") from None
        if isinstance(chunk, dict) and "error" in chunk:
            _check(_validator(schema_pointer(_error_schema(_operation(path, method)[1]))), chunk,
                   f"event {i}: not a valid error")
        else:
            _check(validator, chunk, f"event {i}: not a valid {what}")
        chunks.append(chunk)
    return chunks


# -- named server-sent events (the Responses API) -------------------------------------------------
def sse_events(text: str) -> list[tuple[str | None, str]]:
    """The (`event:` name, `data:` payload) pairs of an event stream, in order."""
    events, name, lines = [], None, []
    for line in text.splitlines() + [""]:
        if not line:
            if lines:
                events.append((name, "\n".join(lines)))
            name, lines = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    return events


@functools.cache
def _event_schemas(path: str, method: str) -> dict[str, str]:
    """Event `type` -> the schema pointer of that event, from the anyOf of the operation's stream schema."""
    _template, operation = _operation(path, method)
    pointer = schema_pointer(_response_object(operation, 200)["content"]["text/event-stream"]["schema"]["$ref"])
    node = spec()
    for part in pointer.strip("/").split("/"):
        node = node[part]
    schemas = {}
    for branch in node["anyOf"]:
        event_pointer = schema_pointer(branch["$ref"])
        target = spec()
        for part in event_pointer.strip("/").split("/"):
            target = target[part]
        for type_ in target.get("properties", {}).get("type", {}).get("enum", []):
            schemas[type_] = event_pointer
    return schemas


def validate_events(path: str, method: str, text: str) -> list[dict]:
    """Each event of a streamed 200 response against the spec's schema for its `type` (ResponseStreamEvent's
    branches for /responses): the `event:` name equals the data's `type`, the `sequence_number`s count up
    from 0, and no `[DONE]` follows (OpenAI's Responses streams end without one). Returns the events."""
    schemas = _event_schemas(path, method)
    events = []
    for i, (name, payload) in enumerate(sse_events(text)):
        try:
            event = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise SpecViolation(f"event {i} is not JSON ({exc}): {payload[:500]!r}") from None
        type_ = event.get("type") if isinstance(event, dict) else None
        if type_ not in schemas:
            raise SpecViolation(f"event {i}: {type_!r} is not an event type of {path}: {payload[:500]!r}")
        if name != type_:
            raise SpecViolation(f"event {i}: `event: {name}` names another type than its data ({type_})")
        if event.get("sequence_number") != i:
            raise SpecViolation(f"event {i}: sequence_number {event.get('sequence_number')!r}, expected {i}")
        _check(_validator(schemas[type_]), event, f"event {i}: not a valid {schemas[type_].rsplit('/', 1)[-1]}")
        events.append(event)
    if not events:
        raise SpecViolation("the stream holds no event")
    return events
