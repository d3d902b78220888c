"""The HTTP routes of `longmem serve` (FastAPI), and `serve()`, which runs them with uvicorn.

Native API (a memory's token goes in `Authorization: Bearer <token>`):

    POST   /v1/memories                       create {name} -> {name, token, stats}
    GET    /v1/memories/{name}                stats
    POST   /v1/memories/{name}/append         {text}: memorize; answered once it is on disk
    GET    /v1/memories/{name}/file           export the memory file (safetensors)
    PUT    /v1/memories/{name}/file           import a memory file (checksum and model checked)
    DELETE /v1/memories/{name}
    POST   /v1/memories/{name}/complete       {prompt, decoding options, stream, append}
    POST   /v1/memories/{name}/chat           {messages, decoding options, stream, append}

OpenAI-compatible: `POST /v1/completions`, `POST /v1/chat/completions` (with `memory`,
`append`), `GET /v1/models`. `GET /health`. OpenAPI page: `/docs`. Every error is
`{"error": {"message", "type", "code"}}` with a 4xx status when the request was at fault.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from longmem.errors import LongMemError
from longmem.server import schemas as S
from longmem.server.auth import bearer_token
from longmem.server.prompts import chat_prompt
from longmem.server.config import ServerConfig
from longmem.server.limits import BodyLimits
from longmem.server.service import ApiError, Result, Service, stats_dict, usage
from longmem.server.store import Conflict, NotFound

log = logging.getLogger("longmem.server")
SSE = "text/event-stream"


def max_file_bytes(spec) -> int:
    """The size of a full one-row memory file of `spec`, plus room for its header."""
    from longmem.memory import MemoryBank

    return MemoryBank.full_size(spec) + (1 << 16)


def create_app(config: ServerConfig, model=None, tokenizer=None) -> FastAPI:
    """The app for `config`; `model`/`tokenizer` default to loading `config.model` on `config.device`."""
    config.validate()
    if model is None:
        from longmem.runtime import load_model
        model, tokenizer = load_model(config.model, config.device)
    service = Service(config, model, tokenizer)
    model_name = config.model

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        yield
        service.scheduler.stop()

    app = FastAPI(title="longmem serve", version="1", lifespan=lifespan,
                  description="A LongMem model with persistent, isolated, named memories. See docs/server.md.")
    app.state.service = service

    # ---- errors: one shape, 4xx for what the request got wrong ------------------------------
    def error(status: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(LongMemError)
    async def on_error(request, e: LongMemError):
        status = getattr(e, "status", 404 if isinstance(e, NotFound) else 409 if isinstance(e, Conflict) else 400)
        return error(status, " ".join(str(e).split()))

    @app.exception_handler(Exception)
    async def on_bug(request, e: Exception):
        log.exception("request failed")
        return error(500, f"internal error ({type(e).__name__}); see the server log")

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            parts.append(f"{where}: {err['msg']}")
        return error(422, "; ".join(parts))

    # ---- helpers ----------------------------------------------------------------------------
    def authorize(name: str, authorization: str | None) -> str:
        return service.authorize(name, bearer_token(authorization))

    async def generation(name: str | None, prompt: str, options, append: bool) -> tuple[list[int], AsyncIterator]:
        ids = service.encode(prompt, "prompt", config.max_prompt_tokens)
        return ids, service.generate(name, ids, options, append)

    def native_options(body: S.Decoding, extra_stops: list[str] = ()):
        fields = body.model_dump(exclude={"stream", "append", "prompt", "messages"})
        fields["stop_strings"] = (fields["stop_strings"] or []) + list(extra_stops) or None
        return service.options(**fields)

    def openai_options(body: S.OpenAIDecoding, max_tokens: int, extra_stops: list[str] = ()):
        if body.model not in (None, model_name):
            raise ApiError(404, f"this server has one model, {model_name!r}; leave `model` out or use that name")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return service.options(max_new_tokens=max_tokens, do_sample=body.temperature > 0,
                               temperature=body.temperature if body.temperature > 0 else 1.0,
                               top_k=body.top_k, top_p=None if body.top_p == 1 else body.top_p,
                               repetition_penalty=body.repetition_penalty, stop_strings=stops + list(extra_stops)
                               or None, seed=body.seed)

    def sse(events: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(events, media_type=SSE, headers={"Cache-Control": "no-cache"})

    async def guarded(events: AsyncIterator[bytes], on_error) -> AsyncIterator[bytes]:
        """A stream whose errors (after the 200 went out) become one last error event."""
        try:
            async for chunk in events:
                yield chunk
        except LongMemError as e:
            status = getattr(e, "status", 404 if isinstance(e, NotFound) else 400)
            yield on_error({"error": {"message": " ".join(str(e).split()), "type": "invalid_request_error",
                                      "code": status}})
        except Exception as e:
            log.exception("generation failed")
            yield on_error({"error": {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                                      "code": 500}})

    # ---- service ----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        batches = service.scheduler.batches
        return {"status": "ok", "model": model_name, "memories_loaded": len(service.store.loaded()),
                "batches_run": len(batches), "rows_run": sum(batches)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "longmem"}]}

    # ---- memories ---------------------------------------------------------------------------
    @app.post("/v1/memories", status_code=201, response_model=S.Created)
    async def create_memory(body: S.CreateMemory):
        token = service.store.create(body.name)
        return {"name": body.name, "token": token, "stats": stats_dict(service.store.stats(body.name))}

    @app.get("/v1/memories/{name}", response_model=S.Stats)
    async def memory_stats(name: str, authorization: str | None = Header(None)):
        authorize(name, authorization)
        async with service.store.lock(name):
            return stats_dict(service.store.stats(name))

    @app.post("/v1/memories/{name}/append", response_model=S.Appended)
    async def append(name: str, body: S.AppendText, authorization: str | None = Header(None)):
        authorize(name, authorization)
        ids = service.encode(body.text, "text to append", config.max_append_tokens)
        async with service.store.lock(name):
            stats = await service.append(name, ids)
        return {"appended_tokens": len(ids), "stats": stats_dict(stats)}

    @app.get("/v1/memories/{name}/file", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def export_memory(name: str, authorization: str | None = Header(None)):
        authorize(name, authorization)
        async with service.store.lock(name):
            data = service.store.file(name).read_bytes()
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}.safetensors"'})

    @app.put("/v1/memories/{name}/file", response_model=S.Stats,
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}}})
    async def import_memory(name: str, request: Request, authorization: str | None = Header(None)):
        authorize(name, authorization)
        data = await request.body()
        if not data:
            raise ApiError(400, "the request body is empty; send a memory file (safetensors) as the body")
        async with service.store.lock(name):
            service.store.import_file(name, data)
            return stats_dict(service.store.stats(name))

    @app.delete("/v1/memories/{name}", status_code=204)
    async def delete_memory(name: str, authorization: str | None = Header(None)):
        authorize(name, authorization)
        async with service.store.lock(name):
            service.store.delete(name)
        return Response(status_code=204)

    # ---- native generation ------------------------------------------------------------------
    async def native(name: str, body: S.Decoding, prompt: str, extra_stops: list[str]):
        ids, events = await generation(name, prompt, native_options(body, extra_stops), body.append)
        if not body.stream:
            return completion_dict(await anext_result(events))

        async def stream():
            async for event in events:
                if isinstance(event, Result):
                    yield event_bytes("done", completion_dict(event))
                else:
                    yield event_bytes("token", {"text": event})
        return sse(guarded(stream(), lambda err: event_bytes("error", err)))

    @app.post("/v1/memories/{name}/complete", response_model=S.Completion,
              responses={200: {"content": {SSE: {}}, "description": "JSON, or server-sent events when stream"}})
    async def complete(name: str, body: S.Complete, authorization: str | None = Header(None)):
        authorize(name, authorization)
        return await native(name, body, body.prompt, [])

    @app.post("/v1/memories/{name}/chat", response_model=S.Completion,
              responses={200: {"content": {SSE: {}}, "description": "JSON, or server-sent events when stream"}})
    async def chat(name: str, body: S.Chat, authorization: str | None = Header(None)):
        authorize(name, authorization)
        prompt, stops = chat_prompt(tokenizer, [m.model_dump() for m in body.messages])
        return await native(name, body, prompt, stops)

    # ---- OpenAI-compatible ------------------------------------------------------------------
    async def openai(body: S.OpenAIDecoding, authorization: str | None, prompt: str, max_tokens: int,
                     extra_stops: list[str], chat: bool):
        if body.memory is not None:
            authorize(body.memory, authorization)
        options = openai_options(body, max_tokens, extra_stops)
        ids, events = await generation(body.memory, prompt, options, body.append)
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name}

        def choice(text: str | None, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            content = {"role": "assistant", "content": text} if not delta else (
                {} if text is None else {"content": text})
            return {"index": 0, "delta" if delta else "message": content, "finish_reason": finish, "logprobs": None}

        if not body.stream:
            result = await anext_result(events)
            out = {**head, "choices": [choice(result.finish.text, result.finish.reason, False)],
                   "usage": usage(result.finish)}
            if result.appended is not None:
                out["memory"] = stats_dict(result.appended)
            return out

        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def stream():
            if chat:
                yield data_bytes({**chunk_head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                             "finish_reason": None, "logprobs": None}]})
            async for event in events:
                if isinstance(event, Result):
                    last = {**chunk_head, "choices": [choice(None, event.finish.reason, True)],
                            "usage": usage(event.finish)}
                    if event.appended is not None:
                        last["memory"] = stats_dict(event.appended)
                    yield data_bytes(last)
                    if include_usage:
                        yield data_bytes({**chunk_head, "choices": [], "usage": usage(event.finish)})
                else:
                    yield data_bytes({**chunk_head, "choices": [choice(event, None, True)]})
            yield b"data: [DONE]\n\n"
        return sse(guarded(stream(), data_bytes))

    @app.post("/v1/completions")
    async def completions(body: S.OpenAICompletion, authorization: str | None = Header(None)):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"`prompt` is a list of {len(prompts)} prompts; send one prompt per request")
        return await openai(body, authorization, prompts[0], body.max_tokens, [], chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: S.OpenAIChat, authorization: str | None = Header(None)):
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both")
        max_tokens = body.max_completion_tokens or body.max_tokens or config.max_new_tokens
        prompt, stops = chat_prompt(tokenizer, [m.model_dump() for m in body.messages])
        return await openai(body, authorization, prompt, max_tokens, stops, chat=True)

    limits = dict(max_json_bytes=config.max_body_bytes, max_upload_bytes=max_file_bytes(model.memory_spec()))
    app.add_middleware(BodyLimits, **limits)
    return app


async def anext_result(events: AsyncIterator) -> Result:
    async for event in events:
        if isinstance(event, Result):
            return event
    raise AssertionError("a generation ended without its result")


def completion_dict(result: Result) -> dict:
    f = result.finish
    return {"text": f.text, "token_ids": f.token_ids, "finish_reason": f.reason, "usage": usage(f),
            "appended": stats_dict(result.appended)}


def event_bytes(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def data_bytes(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def serve(config: ServerConfig) -> None:
    """Load the model, recover the data folder, and serve until interrupted."""
    import uvicorn

    app = create_app(config)
    service: Service = app.state.service
    names = service.store.names()
    print(f"longmem serve: model {config.model} on {service.model.device}; {len(names)} memories in "
          f"{config.data_dir}" + (f" (cleaned up after an interrupted write: {', '.join(service.recovered)})"
                                  if service.recovered else ""), flush=True)
    print(f"longmem serve: http://{config.host}:{config.port} (API docs at /docs)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
