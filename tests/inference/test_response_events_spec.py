"""`validate_events` (tests/openapi_spec.py) rejects what a Responses stream must not send: it is what the
streaming tests rely on, so each rule it checks is shown to fail here (no processes needed)."""

from __future__ import annotations

import json

import pytest

from tests.openapi_spec import SpecViolation, validate_events

DELTA = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
         "delta": "Hi", "logprobs": []}


def sse(*events: dict, names: list[str] | None = None) -> str:
    names = names or [e["type"] for e in events]
    return "".join(f"event: {name}\ndata: {json.dumps(e)}\n\n" for name, e in zip(names, events, strict=True))


def numbered(*events: dict) -> list[dict]:
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


def test_a_well_formed_event_validates_and_comes_back_parsed():
    assert validate_events("/v1/responses", "post", sse(*numbered(DELTA, DELTA))) == numbered(DELTA, DELTA)


@pytest.mark.parametrize(("text", "match"), [
    (sse({**DELTA, "sequence_number": 1}), r"sequence_number 1, expected 0"),
    (sse(*numbered(DELTA), names=["response.output_text.done"]), r"names another type"),
    (sse(*numbered({k: v for k, v in DELTA.items() if k != "item_id"})), r"'item_id' is a required property"),
    (sse(*numbered({**DELTA, "type": "response.output_text.deltas"})), r"is not an event type"),
    (sse(*numbered(DELTA)) + "data: [DONE]\n\n", r"event 1 is not JSON"),
    ("", r"no event"),
])
def test_what_a_responses_stream_must_not_send_is_rejected(text, match):
    with pytest.raises(SpecViolation, match=match):
        validate_events("/v1/responses", "post", text)
