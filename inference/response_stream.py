"""`stream: true` for /v1/responses: the gateway's chat completion stream (already metered and settled by
the one gateway path) translated into the Responses API's semantic events.

Event order, as OpenAI sends it: `response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`, then `response.completed` (or
`response.incomplete` when `max_output_tokens` cut the answer). The chat stream's `[DONE]` comes only
once its usage is recorded, so the final event's usage is the billed usage, and the response is stored
before that final event. A failure of the engine mid-stream becomes an `error` event and
`response.failed`; a client that disconnects is billed like a cut chat stream and nothing is stored.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from .responses import ResponsesRequest, output_message, output_text, response_object, response_shell


def sse_event(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def chat_chunks(part: bytes) -> list[dict | str]:
    """The `data:` payloads in one piece of the gateway's chat stream: parsed chunks, or "[DONE]"."""
    payloads: list[dict | str] = []
    for line in part.decode().splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            payloads.append(data)
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = {"error": {"message": "The model server sent an invalid event.", "code": "server_error"}}
        payloads.append(chunk if isinstance(chunk, dict) else {})
    return payloads


class ResponseStream:
    """One streamed response: numbers its events and keeps the text, the finish reason and the usage."""

    def __init__(self, request: ResponsesRequest, response_id: str, created_at: int,
                 save: Callable[[dict], Awaitable[object]] | None):
        self.request, self.response_id, self.created_at, self.save = request, response_id, created_at, save
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.sequence_number = -1
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: dict = {}

    def event(self, type_: str, **fields) -> bytes:
        self.sequence_number += 1
        return sse_event({"type": type_, **fields, "sequence_number": self.sequence_number})

    def part_fields(self) -> dict:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    async def events(self, chat_stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        shell = response_shell(self.request, self.response_id, self.created_at, "in_progress")
        yield self.event("response.created", response=shell)
        yield self.event("response.in_progress", response=shell)
        yield self.event("response.output_item.added", output_index=0,
                         item=output_message("", self.message_id, "in_progress"))
        yield self.event("response.content_part.added", **self.part_fields(), part=output_text(""))
        async for part in chat_stream:
            for chunk in chat_chunks(part):
                if chunk == "[DONE]":
                    async for event in self.finish():
                        yield event
                    return
                if "error" in chunk:
                    for event in self.fail(chunk["error"]):
                        yield event
                    return
                for delta in self.take(chunk):
                    yield self.event("response.output_text.delta", **self.part_fields(), delta=delta, logprobs=[])

    def take(self, chunk: dict) -> list[str]:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        deltas = []
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.text += content
                deltas.append(content)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return deltas

    async def finish(self) -> AsyncIterator[bytes]:
        chat = {"choices": [{"message": {"content": self.text}, "finish_reason": self.finish_reason}],
                "usage": self.usage}
        body = response_object(self.request, chat, self.response_id, self.created_at, self.message_id)
        message = body["output"][0]
        yield self.event("response.output_text.done", **self.part_fields(), text=self.text, logprobs=[])
        yield self.event("response.content_part.done", **self.part_fields(), part=output_text(self.text))
        yield self.event("response.output_item.done", output_index=0, item=message)
        if self.save is not None:
            await self.save(body)
        yield self.event(f"response.{body['status']}", response=body)

    def fail(self, error: dict) -> list[bytes]:
        code = "rate_limit_exceeded" if error.get("code") == "rate_limit_exceeded" else "server_error"
        message = error.get("message") or "The model server failed while generating the response."
        body = {**response_shell(self.request, self.response_id, self.created_at, "failed"),
                "error": {"code": code, "message": message},
                "output": [output_message(self.text, self.message_id, "incomplete")] if self.text else []}
        return [self.event("error", code=code, message=message, param=None),
                self.event("response.failed", response=body)]
