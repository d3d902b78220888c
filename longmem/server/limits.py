"""`BodyLimits`: an ASGI middleware that checks request bodies before any route sees them.

- A body larger than its limit is refused with 413 (by its Content-Length when it has one,
  else while it streams in), before it is read into memory whole.
- A JSON body (every route except the memory-file upload) must be UTF-8 and well-formed
  JSON, with no unpaired surrogate escapes (`"\\ud800"` is valid JSON but no text): else 400
  with a message that says where it broke. Routes then never see undecodable input, so it
  can never become a 500.
The checked body is replayed to the app unchanged.
"""

from __future__ import annotations

import json
import re
from typing import Callable


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> bytes:
    """The server's one error shape (OpenAI's): {"error": {"message", "type", "code"}}."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


class BodyLimits:
    def __init__(self, app, max_json_bytes: int, max_upload_bytes: int, upload_path: str = r"/v1/memories/[^/]+/file"):
        self.app = app
        self.max_json, self.max_upload = max_json_bytes, max_upload_bytes
        self.upload = re.compile(upload_path)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        upload = bool(self.upload.fullmatch(scope["path"]))
        limit = self.max_upload if upload else self.max_json
        what = "a memory file" if upload else "a JSON request body"
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(send, 413, f"{what} may be at most {limit:,} bytes; this one is "
                                                 f"{length.decode(errors='replace')} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(send, 413, f"{what} may be at most {limit:,} bytes; this one is larger")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not upload and body:
            problem = json_problem(body)
            if problem:
                return await self._refuse(send, 400, problem)
        return await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        body = error_body(status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def json_problem(body: bytes) -> str | None:
    """What is wrong with a JSON request body, in one line, or None when it is fine."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"the request body is not UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}); send JSON encoded "
                f"as UTF-8")
    try:
        json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as e:
        return f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); send one JSON object"
    except RecursionError:
        return "the request body nests JSON too deeply; send a flat JSON object"
    except UnicodeEncodeError:
        return "the request body has a \\u escape of an unpaired surrogate, which is not text; send valid Unicode"
    return None


def _replay(body: bytes, receive) -> Callable:
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would
    return replayed
