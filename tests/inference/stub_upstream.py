"""A small OpenAI-compatible upstream with purpose-built faults, run as its own process by the gateway
tests and the overhead benchmark: `python tests/inference/stub_upstream.py --port P`.

The behaviour of each request is picked by its `user` field, `"stub:MODE"` (the gateway passes `user`
through; it refuses unknown fields): "ok" (default), "stall" (never answers in time), "stall_midway" (stream: a few
chunks, then silence), "close_midway" (stream: a few chunks, then the connection drops), "error500",
"slow_stream" (one chunk per 50 ms, for disconnect tests), "error429" (the upstream's own rate limit), "nousage"
(answers without `usage`, as some servers do). A model name `mode:MODE` picks the mode instead, so one stub
process serves as several deployments that fail differently (the failover tests). GET /_requests returns what
it received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

RECEIVED: list[dict] = []
EVENTS: dict[str, dict] = {}
WORDS = ["Hello", " from", " the", " stub", " upstream", ".", " It", " counts", " tokens", " simply"]


def prompt_tokens(body: dict) -> int:
    if "messages" in body:
        text = "".join(str(m.get("content") or "") for m in body["messages"])
        return max(1, len(text.split())) + 4 * len(body["messages"])
    prompt = body.get("prompt", "")
    return len(prompt) if isinstance(prompt, list) else len(str(prompt).split())


def usage(body: dict, completion: int) -> dict:
    p = prompt_tokens(body)
    return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}


def completion_length(body: dict) -> int:
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or 8
    return min(int(limit), 8) if stub_mode(body) in ("ok", "stall_midway", "close_midway", "nousage") else int(limit)


def stub_mode(body: dict) -> str:
    model = str(body.get("model") or "")
    if model.startswith("mode:"):
        return model.removeprefix("mode:")
    user = body.get("user") or ""
    return user.removeprefix("stub:") if user.startswith("stub:") else "ok"


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def tokenize(request: Request) -> Response:
    body = await request.json()
    count = prompt_tokens(body)
    return JSONResponse({"count": count, "tokens": list(range(count)), "max_model_len": 4096})


async def requests_seen(request: Request) -> Response:
    return JSONResponse({"received": RECEIVED[-200:], "events": EVENTS})


def chunk(rid: str, chat: bool, model: str, text: str | None, finish: str | None = None, role: bool = False) -> bytes:
    if chat:
        delta = {} if text is None else {"content": text}
        if role:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        obj = "text_completion"
    data = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(data)}\n\n".encode()


async def generate(request: Request) -> Response:
    body = await request.json()
    chat = request.url.path.endswith("/chat/completions")
    mode = stub_mode(body)
    rid = request.headers.get("x-request-id", "none")
    RECEIVED.append({"path": request.url.path, "body": body, "headers": dict(request.headers)})
    event = EVENTS.setdefault(rid, {"yielded": 0, "cancelled": False, "finished": False})
    model = body.get("model", "stub")
    n = completion_length(body)
    if mode == "stall":
        await asyncio.sleep(60)
    if mode == "error500":
        return JSONResponse({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}, 500)
    if mode == "error429":
        return JSONResponse({"error": {"message": "slow down", "type": "requests", "param": None,
                                       "code": "rate_limit_exceeded"}}, 429)
    if not body.get("stream"):
        text = "".join(WORDS[i % len(WORDS)] for i in range(n))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length"}
        event["yielded"], event["finished"] = n, True
        answer = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                  "model": model, "choices": [choice], "usage": usage(body, n)}
        if mode == "nousage":
            del answer["usage"]
        return JSONResponse(answer)

    async def events():
        try:
            if chat:
                yield chunk(rid, chat, model, "", role=True)
            for i in range(n):
                if mode == "slow_stream":
                    await asyncio.sleep(0.05)
                if mode in ("close_midway", "stall_midway") and i == 3:
                    if mode == "stall_midway":
                        await asyncio.sleep(60)
                    raise RuntimeError("stub: dropping the connection midway")
                event["yielded"] += 1
                yield chunk(rid, chat, model, WORDS[i % len(WORDS)])
            yield chunk(rid, chat, model, None, "length")
            if (body.get("stream_options") or {}).get("include_usage") and mode != "nousage":
                data = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()), "model": model, "choices": [], "usage": usage(body, n)}
                yield f"data: {json.dumps(data)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            event["finished"] = True
        except asyncio.CancelledError:
            event["cancelled"] = True
            raise

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(routes=[
    Route("/health", health),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/_requests", requests_seen),
    Route("/v1/chat/completions", generate, methods=["POST"]),
    Route("/v1/completions", generate, methods=["POST"]),
])

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
