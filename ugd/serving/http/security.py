"""The guard in front of every ``/v1`` call: the API key, then the body size, before any JSON is parsed.

An ASGI middleware rather than a FastAPI dependency because FastAPI parses the body before it runs
dependencies: an unauthenticated client would otherwise learn about its JSON before it learns it needs
a key, and an oversized body would be read whole first.

* With an API key set, ``Authorization: Bearer <key>`` is required; anything else gets 401 with
  ``WWW-Authenticate: Bearer``. The key is compared with ``hmac.compare_digest`` (time independent of
  where the strings differ).
* A body longer than ``max_body_bytes`` gets 413: by its Content-Length at once, or, for a chunked
  body, as soon as the bytes read pass the limit. The body is then handed to the app from memory.
"""

from __future__ import annotations

import hmac
import json

PROTECTED_PREFIX = "/v1/"


async def send_json_error(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def key_matches(header: str | None, api_key: str) -> bool:
    """Whether an Authorization header value carries ``api_key`` as a bearer token (constant time)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), api_key.encode("utf-8"))


class GuardMiddleware:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not key_matches(headers.get("authorization"), self.api_key):
            why = "missing" if "authorization" not in headers else "wrong"
            return await send_json_error(send, 401, f"the API key is {why}: send the header "
                                         "'Authorization: Bearer <key>' with the key the server was started with",
                                         [(b"www-authenticate", b"Bearer")])
        limit = self.max_body_bytes
        too_big = f"the request body is larger than the server's limit of {limit} bytes (--max_body_bytes); " \
                  "send fewer or shorter texts per call"
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await send_json_error(send, 400, "the Content-Length header is not a number")
        if declared > limit:
            return await send_json_error(send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await send_json_error(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


__all__ = ["GuardMiddleware", "key_matches"]
