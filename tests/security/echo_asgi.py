"""A tiny ASGI app that answers with the client address uvicorn decided on (tests/security/test_forwarded_ips.py)."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = (scope["client"][0] if scope.get("client") else "").encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
