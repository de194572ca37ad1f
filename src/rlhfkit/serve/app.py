"""The OpenAI-compatible HTTP server over a local model (`rlhfkit serve`): FastAPI, continuous batching.

    rlhfkit serve --model runs/ppo --port 8000 [--api-key KEY] [--max-batch 32]

Routes: GET /health (no key needed: status, running rows, waiting rows), GET /v1/models,
POST /v1/chat/completions, POST /v1/completions. What the bodies accept is in `serve.protocol`; how
answers are batched in `serve.scheduler`; tool calls in `serve.tools` and `rlhfkit.data.toolcalls`.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``, never a traceback: 400 for a
malformed body or a bad value (naming the field), 401 for a missing or wrong key, 404 for an unknown model
or route, 413 for a body over `max_body` bytes, 429 with Retry-After when the queue is full, 500 (logged
with its traceback on the server) for a bug. A client that disconnects cancels its generation.

Security: binds 127.0.0.1 unless told otherwise; with an API key every route but /health needs
``Authorization: Bearer KEY``, compared in constant time; request bodies, `n` and `max_tokens` are bounded.
Where this departs from OpenAI: one model per server; `max_tokens` defaults to what the context has left,
capped at the server's `max_tokens` limit (a bound on the KV cache), not to the whole context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from rlhfkit.data.encoding import char_limit, prompt_ids, text_chars
from rlhfkit.feedback.security import same_secret
from rlhfkit.models.loading import context_length
from rlhfkit.rollout.engine import RolloutEngine, SamplingConfig
from rlhfkit.serve.protocol import APIError, ChatRequest, CompletionRequest, NamedChoice, Sampling, parse
from rlhfkit.serve.responses import Exchange, sse
from rlhfkit.serve.scheduler import Delta, Done, Event, Failed, Job, Overloaded, Scheduler
from rlhfkit.serve.scheduler import Request as GenRequest
from rlhfkit.serve.tools import render_chat

log = logging.getLogger("rlhfkit.serve")


def create_app(  # noqa: C901, PLR0915 - the routes are closures over the app's state
    engine: RolloutEngine,
    model_id: str,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 128,
    max_tokens: int = 2048,
    max_body: int = 4 * 1024 * 1024,
) -> FastAPI:
    """The app over a loaded engine; `model_id` is the name clients ask for."""
    scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
    tokenizer = engine.tokenizer
    context = context_length(engine.model)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="rlhfkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler

    # ------------------------------------------------------------------------------ errors and auth
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed: %s %s", request.method, request.url.path)
        error = APIError(500, "internal server error; see the server's log", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        if api_key and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not same_secret(given.strip(), api_key):
                error = APIError(401, "missing or incorrect API key (Authorization: Bearer KEY)",
                                 code="invalid_api_key")  # fmt: skip
                return JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise APIError(413, f"the request body is over {max_body} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise APIError(413, f"the request body is over {max_body} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------------------ routes
    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **scheduler.stats()}

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "rlhfkit",
                "max_model_len": context}  # fmt: skip

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server has {model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def sampling(
        req: Sampling, prompt_len: int, asked: int | None, field: str, prompt: str
    ) -> SamplingConfig:
        """The request's settings, after the checks of `n` and of the lengths (context, server limit)."""
        if req.n > max_batch:
            raise APIError(400, f"n: at most {max_batch} on this server (--max-batch)", param="n")
        if asked is not None and asked > max_tokens:
            raise APIError(400, f"{field}: at most {max_tokens} on this server", param=field)
        room = context - prompt_len
        if room < 1:
            message = f"{prompt}: {prompt_len} tokens, but this model's context is {context} tokens"
            raise APIError(400, message, param=prompt, code="context_length_exceeded")
        if asked is not None and asked > room:
            message = f"{field}: {asked} more tokens do not fit after the {prompt_len} of the {prompt} in "
            raise APIError(400, message + f"this model's context of {context}", param=field,
                           code="context_length_exceeded")  # fmt: skip
        return SamplingConfig(
            max_new_tokens=asked or min(room, max_tokens), temperature=req.temperature, top_p=req.top_p,
            top_k=max(req.top_k, 0), stop_at_eos=not req.ignore_eos,
        )  # fmt: skip

    def submit(requests: list[GenRequest]) -> tuple[list[Job], asyncio.Queue[tuple[Job, Event]]]:
        events: asyncio.Queue[tuple[Job, Event]] = asyncio.Queue()
        jobs: list[Job] = []
        try:
            for r in requests:
                jobs.append(scheduler.submit(r, events))
        except Overloaded as exc:
            for job in jobs:
                job.cancel()
            raise APIError(429, str(exc), code="rate_limit_exceeded", type="rate_limit_error",
                           headers={"Retry-After": str(exc.retry_after)}) from None  # fmt: skip
        return jobs, events

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req: ChatRequest = parse(await read_body(request), ChatRequest)
        check_model(req.model)
        messages = [m.plain() for m in req.messages]
        if text_chars(messages) > char_limit(tokenizer, context):
            raise APIError(400, f"the messages are far longer than this model's context of {context} tokens",
                           param="messages", code="context_length_exceeded")  # fmt: skip
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedChoice) else req.tool_choice

        def render() -> Any:
            with scheduler.tokenizer_lock:
                return render_chat(tokenizer, messages, tools, choice or "auto")

        try:
            rendered = await run_in_threadpool(render)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        config = sampling(req, len(rendered.ids), req.limit, field, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        gen = GenRequest(rendered.ids, config, req.n, req.seed, req.stops, top)
        jobs, events = submit([gen])
        exchange = Exchange("chat", model_id, jobs, len(rendered.ids), rendered.read_calls, [rendered.prefix])
        return await answer(request, req, exchange, events)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse(await read_body(request), CompletionRequest)
        check_model(req.model)
        vocab = len(tokenizer)
        ids_list, texts = [], []
        for i, prompt in enumerate(req.prompts):
            if isinstance(prompt, str):
                if len(prompt) > char_limit(tokenizer, context):
                    raise APIError(400, f"prompt[{i}] is far longer than this model's context of {context} "
                                   "tokens", param="prompt", code="context_length_exceeded")  # fmt: skip
                with scheduler.tokenizer_lock:
                    ids = prompt_ids(tokenizer, prompt)
                texts.append(prompt)
            else:
                if any(t < 0 or t >= vocab for t in prompt):
                    raise APIError(400, f"prompt[{i}]: token ids must be in [0, {vocab})", param="prompt")
                ids = list(prompt)
                with scheduler.tokenizer_lock:
                    texts.append(tokenizer.decode(ids))
            if not ids:
                raise APIError(400, f"prompt[{i}] has no tokens", param="prompt")
            ids_list.append(ids)
        configs = [sampling(req, len(ids), req.max_tokens, "max_tokens", "prompt") for ids in ids_list]
        gens = [
            GenRequest(ids, config, req.n, req.seed, req.stops, req.logprobs, strip=False)
            for ids, config in zip(ids_list, configs, strict=True)
        ]
        jobs, events = submit(gens)
        prefixes = texts if req.echo else [""] * len(texts)
        exchange = Exchange("text", model_id, jobs, sum(map(len, ids_list)), False, prefixes)
        return await answer(request, req, exchange, events)

    # ------------------------------------------------------------------------------ answering
    async def answer(
        request: Request, req: Sampling, exchange: Exchange, events: asyncio.Queue[tuple[Job, Event]]
    ) -> Response:
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream(exchange, events, include_usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )  # fmt: skip
        watcher = asyncio.create_task(disconnected(request))
        try:
            while not exchange.finished:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    raise asyncio.CancelledError  # the client went away
                failure = consume(exchange, *getter.result())
                if failure is not None:
                    raise APIError(500, failure, type="server_error")
        finally:
            watcher.cancel()
            for job in exchange.jobs:
                job.cancel()  # a no-op once it is done
        return JSONResponse(exchange.body())

    def consume(exchange: Exchange, job: Job, event: Event, out: list[dict] | None = None) -> str | None:
        """Apply one scheduler event; chunks for a stream go to `out`. Returns a failure's message."""
        if isinstance(event, Failed):
            return event.message
        if isinstance(event, Done):
            exchange.done += 1
            exchange.completion_tokens += event.completion_tokens
            return None
        for delta in event:
            assert isinstance(delta, Delta)
            choice, pieces = exchange.apply(job, delta)
            if out is not None:
                out += exchange.chunks(choice, delta, pieces)
        return None

    async def stream(
        exchange: Exchange, events: asyncio.Queue[tuple[Job, Event]], include_usage: bool
    ) -> AsyncIterator[str]:
        try:
            for chunk in exchange.first_chunks():
                yield sse(chunk)
            while not exchange.finished:
                out: list[dict] = []
                failure = consume(exchange, *(await events.get()), out=out)
                if failure is not None:
                    error = APIError(500, failure, type="server_error")
                    yield sse(error.body())
                    break
                if out:
                    yield "".join(sse(chunk) for chunk in out)
            if include_usage and exchange.finished:
                yield sse(exchange.usage_chunk())
            yield sse("[DONE]")
        finally:  # also when the client disconnects: Starlette cancels this generator
            for job in exchange.jobs:
                job.cancel()

    return app


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
