"""`stream: true` for /v1/responses: the gateway's chat completion stream (already metered and settled by
the one gateway path) translated into the Responses API's semantic events.

Event order, as OpenAI sends it: `response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`, then `response.completed` (or
`response.incomplete` when `max_output_tokens` cut the answer). The chat stream's `[DONE]` comes only
once its usage is recorded, so the final event's usage is the billed usage, and the response is stored
before that final event. A function call the model makes is its own output item:
`response.output_item.added` (a `function_call`), `response.function_call_arguments.delta`,
`response.function_call_arguments.done`, `response.output_item.done`. A failure of the engine mid-stream becomes an `error` event and
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
    """One streamed response: numbers its events and keeps its output items, the finish reason and the usage."""

    def __init__(self, request: ResponsesRequest, response_id: str, created_at: int,
                 save: Callable[[dict], Awaitable[object]] | None):
        self.request, self.response_id, self.created_at, self.save = request, response_id, created_at, save
        self.sequence_number = -1
        self.items: list[dict] = []  # the output items in stream order; the last one may still be open
        self.open = False
        self.finish_reason: str | None = None
        self.usage: dict = {}

    def event(self, type_: str, **fields) -> bytes:
        self.sequence_number += 1
        return sse_event({"type": type_, **fields, "sequence_number": self.sequence_number})

    def item_fields(self) -> dict:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    async def events(self, chat_stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        shell = response_shell(self.request, self.response_id, self.created_at, "in_progress")
        yield self.event("response.created", response=shell)
        yield self.event("response.in_progress", response=shell)
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
                for event in self.take(chunk):
                    yield event

    def take(self, chunk: dict) -> list[bytes]:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self.text_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self.call_delta(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return events

    def text_delta(self, text: str) -> list[bytes]:
        events = []
        if not (self.open and self.items[-1]["type"] == "message"):
            events += self.close() + self.open_message()
        self.items[-1]["content"][0]["text"] += text
        events.append(self.event("response.output_text.delta", **self.item_fields(), content_index=0, delta=text,
                                 logprobs=[]))
        return events

    def open_message(self) -> list[bytes]:
        item = output_message("", f"msg_{uuid.uuid4().hex}", "in_progress")
        self.items.append({**item, "content": [output_text("")]})
        self.open = True
        return [self.event("response.output_item.added", output_index=len(self.items) - 1, item=item),
                self.event("response.content_part.added", **self.item_fields(), content_index=0, part=output_text(""))]

    def call_delta(self, call: dict) -> list[bytes]:
        function = call.get("function") or {}
        events = []
        if call.get("id"):  # a new call: its id and name first, its arguments after
            events += self.close()
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                    "name": function.get("name") or "", "arguments": "", "status": "in_progress"}
            self.items.append(item)
            self.open = True
            events.append(self.event("response.output_item.added", output_index=len(self.items) - 1, item=dict(item)))
        if function.get("arguments") and self.open and self.items[-1]["type"] == "function_call":
            self.items[-1]["arguments"] += function["arguments"]
            events.append(self.event("response.function_call_arguments.delta", **self.item_fields(),
                                     delta=function["arguments"]))
        return events

    def close(self) -> list[bytes]:
        """The `.done` events of the open item, which becomes final."""
        if not self.open:
            return []
        self.open = False
        item = self.items[-1]
        if item["type"] == "function_call":
            item["status"] = "completed"
            return [self.event("response.function_call_arguments.done", **self.item_fields(), name=item["name"],
                               arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=len(self.items) - 1, item=item)]
        item["status"] = "incomplete" if self.finish_reason == "length" else "completed"
        text = item["content"][0]["text"]
        return [self.event("response.output_text.done", **self.item_fields(), content_index=0, text=text,
                           logprobs=[]),
                self.event("response.content_part.done", **self.item_fields(), content_index=0,
                           part=output_text(text)),
                self.event("response.output_item.done", output_index=len(self.items) - 1, item=item)]

    async def finish(self) -> AsyncIterator[bytes]:
        events = [] if self.items else self.open_message()  # an empty answer is still one (empty) message
        for event in events + self.close():
            yield event
        chat = {"choices": [{"message": {}, "finish_reason": self.finish_reason}], "usage": self.usage}
        body = {**response_object(self.request, chat, self.response_id, self.created_at), "output": self.items}
        if self.save is not None:
            await self.save(body)
        yield self.event(f"response.{body['status']}", response=body)

    def fail(self, error: dict) -> list[bytes]:
        code = "rate_limit_exceeded" if error.get("code") == "rate_limit_exceeded" else "server_error"
        message = error.get("message") or "The model server failed while generating the response."
        for item in self.items:
            item["status"] = "completed" if item is not self.items[-1] or not self.open else "incomplete"
        body = {**response_shell(self.request, self.response_id, self.created_at, "failed"),
                "error": {"code": code, "message": message}, "output": self.items}
        return [self.event("error", code=code, message=message, param=None),
                self.event("response.failed", response=body)]
