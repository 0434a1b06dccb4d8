"""The OpenAI-compatible FastAPI app: models, completions, chat completions, adapter admin.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}`` with its status:
400 malformed JSON / unsupported parameter / prompt too long, 401 missing or wrong key, 403 admin
disabled or path outside the adapter root, 404 unknown model / adapter / route, 408 timeout, 409
name taken, 413 body too large, 422 a field of the wrong type or out of range, 429 queue full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve import protocol as P
from lorakit.serve.bridge import Generation
from lorakit.serve.engine import Engine, GenerationEvent
from lorakit.serve.errors import BadRequest, EngineUnavailable, InvalidParams, NotFound, ServeError
from lorakit.serve.generation import SamplingError, SamplingParams
from lorakit.serve.http import ServeSettings, check_key, error_response, parse, read_json, sse
from lorakit.serve.registry import AdapterRegistry

logger = logging.getLogger(__name__)
FALLBACK_CHAT_TEMPLATE = (  # used when the base tokenizer has none: plain "role: content" lines
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def create_app(engine: Engine, registry: AdapterRegistry, tokenizer, settings: ServeSettings) -> FastAPI:
    """The app; its lifespan starts the engine's worker and stops it on shutdown."""
    created = int(time.time())
    vocab_size = engine.host.config.vocab_size

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.registry = engine, registry  # for tests and embedding applications

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(InvalidParams(str(exc.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        error = ServeError(str(exc.detail), status=exc.status_code,
                           code="not_found" if exc.status_code == 404 else None)
        return error_response(error)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # pragma: no cover - a bug, not a bad request
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": "internal server error", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    # ------------------------------------------------------------------ helpers
    def sampling(req: P._Request, max_tokens: int | None, default: int) -> SamplingParams:
        req.check_supported()
        if max_tokens is not None and max_tokens > settings.max_tokens_cap:
            raise BadRequest(f"max_tokens={max_tokens} exceeds this server's cap of {settings.max_tokens_cap}",
                             param="max_tokens")
        try:
            return SamplingParams(max_tokens=max_tokens or min(default, settings.max_tokens_cap),
                                  temperature=float(req.temperature), top_p=float(req.top_p), stop=req.stop_list(),
                                  seed=req.seed, ignore_eos=req.ignore_eos)
        except SamplingError as exc:
            raise BadRequest(str(exc)) from None

    def check_prompt(ids: list[int]) -> list[int]:
        if not ids:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise BadRequest("the prompt is empty", param="prompt")
            ids = [bos]
        if len(ids) >= engine.max_context:
            raise BadRequest(f"the prompt has {len(ids)} tokens; this model's context is {engine.max_context}",
                             param="prompt", code="context_length_exceeded")
        return ids

    def completion_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if len(prompts) > settings.max_prompts:
            raise BadRequest(f"at most {settings.max_prompts} prompts per request", param="prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(tokenizer(p, add_special_tokens=True)["input_ids"])
            else:
                if any(not 0 <= t < vocab_size for t in p):
                    raise BadRequest(f"token ids must be in [0, {vocab_size})", param="prompt")
                out.append(list(p))
        return [check_prompt(ids) for ids in out]

    def chat_prompt(messages: list[P.ChatMessage]) -> list[int]:
        # "developer" is OpenAI's newer name for "system"; model templates know only the latter
        conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in messages]
        template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
        try:
            text = tokenizer.apply_chat_template(conversation, chat_template=template, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as exc:  # templates raise on e.g. non-alternating roles: the request's fault
            raise BadRequest(f"the model's chat template rejected these messages: {exc}", param="messages") from None
        return check_prompt(tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if not engine.alive:  # the worker is gone: every request would time out
            return error_response(EngineUnavailable("the generation engine is not running; restart the server"))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request, settings)
        data = [P.model_card(settings.base_name, created)]
        data += [P.model_card(n, created, parent=settings.base_name, loaded=loaded)
                 for n, _, loaded in registry.names()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        check_key(request, settings)
        if model_id == settings.base_name:
            return P.model_card(model_id, created)
        for name, _, loaded in registry.names():
            if name == model_id:
                return P.model_card(name, created, parent=settings.base_name, loaded=loaded)
        raise NotFound(f"The model `{model_id}` does not exist", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request, settings)
        req = parse(P.CompletionRequest, await read_json(request, settings.max_body_bytes, settings.body_timeout))
        adapter = registry.resolve(req.model)
        params = sampling(req, req.max_tokens, default=16)
        prompts = completion_prompts(req.prompt)
        gen = Generation(engine, prompts, adapter, params, settings.request_timeout)
        rid = P.new_id("cmpl")
        if req.stream:  # the first event arrives before the 200: admission errors keep their status
            events = await _started(gen)
            return _stream(_completion_events(gen, events, rid, req.model, req.include_usage, prompts))
        texts, finish, done = [""] * len(prompts), [None] * len(prompts), [0] * len(prompts)
        async for i, ev in gen.events():
            texts[i] += ev.text
            if ev.final:
                finish[i], done[i] = ev.finish_reason, ev.completion_tokens
        choices = [{"index": i, "text": t, "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
        return P.completion(rid, req.model, choices, sum(map(len, prompts)), sum(done))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request, settings)
        req = parse(P.ChatCompletionRequest, await read_json(request, settings.max_body_bytes,
                                                              settings.body_timeout))
        adapter = registry.resolve(req.model)
        params = sampling(req, req.max_completion_tokens or req.max_tokens, default=settings.max_tokens_cap)
        ids = chat_prompt(req.messages)
        gen = Generation(engine, [ids], adapter, params, settings.request_timeout)
        rid = P.new_id("chatcmpl")
        if req.stream:
            events = await _started(gen)
            return _stream(_chat_events(gen, events, rid, req.model, req.include_usage, len(ids)))
        text, finish, tokens = "", None, 0
        async for _, ev in gen.events():
            text += ev.text
            if ev.final:
                finish, tokens = ev.finish_reason, ev.completion_tokens
        return P.chat_completion(rid, req.model, text, finish, len(ids), tokens)

    @app.get("/v1/stats")
    async def stats(request: Request):
        check_key(request, settings)
        return {"engine": asdict(engine.stats), "loaded_adapters": len(registry.loaded),
                "adapter_loads": registry.loads, "adapters": registry.timing_summary()}

    from lorakit.serve.admin import add_admin_routes
    from lorakit.serve.ops import add_ops

    add_admin_routes(app, engine, registry, settings)
    add_ops(app, engine, registry, settings)  # /metrics, access log, drain on SIGTERM
    return app


async def _started(gen: Generation) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """gen's events, the first one already awaited (so its error, if any, raises here)."""
    events = gen.events()
    first = await anext(events)

    async def chain():
        yield first
        async for item in events:
            yield item

    return chain()


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _completion_events(gen: Generation, events: AsyncIterator[tuple[int, GenerationEvent]], rid: str,
                             model: str, include_usage: bool, prompts: list[list[int]]) -> AsyncIterator[str]:
    completion_tokens = 0
    try:
        async for i, ev in events:
            if ev.text or ev.final:
                yield sse(P.completion_chunk(rid, model, i, ev.text, ev.finish_reason))
            if ev.final:
                completion_tokens += ev.completion_tokens
        if include_usage:
            yield sse(P.usage_chunk(rid, model, "text_completion", sum(map(len, prompts)), completion_tokens))
    except ServeError as exc:  # headers are sent: report in the stream, as OpenAI does
        yield sse(exc.body())
    finally:
        gen.cancel()  # client gone or done: free the batch rows
    yield sse("[DONE]")


async def _chat_events(gen: Generation, events: AsyncIterator[tuple[int, GenerationEvent]], rid: str,
                       model: str, include_usage: bool, prompt_tokens: int) -> AsyncIterator[str]:
    try:
        yield sse(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        async for _, ev in events:
            if ev.text:
                yield sse(P.chat_chunk(rid, model, {"content": ev.text}, None))
            if ev.final:
                yield sse(P.chat_chunk(rid, model, {}, ev.finish_reason))
                if include_usage:
                    yield sse(P.usage_chunk(rid, model, "chat.completion.chunk", prompt_tokens,
                                            ev.completion_tokens))
    except ServeError as exc:
        yield sse(exc.body())
    finally:
        gen.cancel()
    yield sse("[DONE]")
