"""JSON schemas for the structured-output tests: the shapes the issue lists (nested objects, bounded arrays,
enums, anyOf, $ref/$defs, string patterns and formats), each with a prompt that asks for it.

Strings are bounded (maxLength, pattern, format, enum) where a weak model would otherwise write on until
max_tokens; the suite checks answers that stop, and how many do.
"""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 24}

SCHEMAS: list[tuple[str, dict]] = [
    ("a person", {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                  "required": ["name", "age"], "additionalProperties": False}),
    ("a traffic light colour", {"type": "object", "properties": {"colour": {"enum": ["red", "amber", "green"]}},
                                "required": ["colour"], "additionalProperties": False}),
    ("a book with its author", {"type": "object", "properties": {
        "title": NAME, "author": {"type": "object", "properties": {"name": NAME, "born": {"type": "integer"}},
                                  "required": ["name", "born"], "additionalProperties": False}},
        "required": ["title", "author"], "additionalProperties": False}),
    ("one to three lucky numbers", {"type": "object", "properties": {
        "numbers": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                    "minItems": 1, "maxItems": 3}}, "required": ["numbers"], "additionalProperties": False}),
    ("two cities with their countries", {"type": "object", "properties": {"cities": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city", "country"],
            "additionalProperties": False}}}, "required": ["cities"], "additionalProperties": False}),
    ("an id that is a word or a number", {"type": "object", "properties": {
        "id": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 12}]}},
        "required": ["id"], "additionalProperties": False}),
    ("a line from one point to another", {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False}),
    ("a flight code like ABC-12", {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"],
        "additionalProperties": False}),
    ("a meeting date", {"type": "object", "properties": {"date": {"type": "string", "format": "date"}},
                        "required": ["date"], "additionalProperties": False}),
    ("a contact email", {"type": "object", "properties": {"email": {"type": "string", "format": "email",
                                                                     "maxLength": 40}},
                         "required": ["email"], "additionalProperties": False}),
    ("a feature flag", {"type": "object", "properties": {"enabled": {"type": "boolean"}, "note": {"type": "null"}},
                        "required": ["enabled", "note"], "additionalProperties": False}),
    ("a version record", {"type": "object", "properties": {"kind": {"const": "version"},
                                                           "major": {"type": "integer", "minimum": 0, "maximum": 9}},
                          "required": ["kind", "major"], "additionalProperties": False}),
    ("a temperature in celsius", {"type": "object", "properties": {
        "celsius": {"type": "number", "minimum": -50, "maximum": 60}}, "required": ["celsius"],
        "additionalProperties": False}),
    ("a pet, cat or dog", {"type": "object", "properties": {"pet": {"oneOf": [
        {"type": "object", "properties": {"cat": NAME}, "required": ["cat"], "additionalProperties": False},
        {"type": "object", "properties": {"dog": NAME}, "required": ["dog"], "additionalProperties": False}]}},
        "required": ["pet"], "additionalProperties": False}),
    ("a user with an optional nickname", {"type": "object", "properties": {"user": NAME, "nickname": NAME},
                                          "required": ["user"], "additionalProperties": False}),
    ("a small grid of digits", {"type": "object", "properties": {"grid": {
        "type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
        "required": ["grid"], "additionalProperties": False}),
    ("a dice roll", {"type": "object", "properties": {"roll": {"enum": [1, 2, 3, 4, 5, 6]}},
                     "required": ["roll"], "additionalProperties": False}),
    ("a product with a price", {"allOf": [
        {"type": "object", "properties": {"product": NAME}, "required": ["product"]},
        {"type": "object", "properties": {"price": {"type": "number", "minimum": 0}}, "required": ["price"]}]}),
    ("a three letter word", {"type": "object", "properties": {"word": {"type": "string", "minLength": 3,
                                                                       "maxLength": 3}},
                             "required": ["word"], "additionalProperties": False}),
    ("a positive count", {"type": "object", "properties": {"count": {"type": "integer", "exclusiveMinimum": 0,
                                                                      "maximum": 1000}},
                          "required": ["count"], "additionalProperties": False}),
    ("a coordinate pair", {"type": "object", "properties": {"pair": {
        "type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}], "items": False}},
        "required": ["pair"], "additionalProperties": False}),
    ("a middle name or null", {"type": "object", "properties": {"middle": {"type": ["string", "null"],
                                                                           "maxLength": 16}},
                               "required": ["middle"], "additionalProperties": False}),
    ("a task with a status and tags", {"type": "object", "properties": {
        "task": NAME, "status": {"enum": ["todo", "doing", "done"]},
        "tags": {"type": "array", "items": {"enum": ["work", "home", "urgent"]}, "maxItems": 3}},
        "required": ["task", "status", "tags"], "additionalProperties": False}),
    ("a tree of at most two levels", {
        "$defs": {"leaf": {"type": "object", "properties": {"label": NAME}, "required": ["label"],
                           "additionalProperties": False}},
        "type": "object", "properties": {"label": NAME, "children": {"type": "array", "maxItems": 2,
                                                                     "items": {"$ref": "#/$defs/leaf"}}},
        "required": ["label", "children"], "additionalProperties": False}),
]
