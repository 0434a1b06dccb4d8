"""The OpenAI-compatible FastAPI app: models, completions, chat completions, adapter admin.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}`` with its status:
400 malformed JSON / unsupported parameter / prompt too long, 401 missing or wrong key, 403 admin
disabled or path outside the adapter root, 404 unknown model / adapter / route, 408 timeout, 409
name taken, 413 body too large, 422 a field of the wrong type or out of range, 429 queue full.

A request's sequences (its prompts × n choices; choice j of a seeded request uses
``choice_seed(seed, j)``) run as separate rows of the same continuous batch. When the client goes
away, streaming or not, every row of its request is cancelled and leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve import protocol as P
from lorakit.serve.bridge import Generation
from lorakit.serve.choices import ChatChoice, CompletionChoice
from lorakit.serve.engine import Engine, GenerationEvent
from lorakit.serve.errors import (
    BadRequest,
    ClientDisconnected,
    EngineUnavailable,
    InvalidParams,
    NotFound,
    ServeError,
)
from lorakit.serve.generation import SamplingError, SamplingParams, choice_seed
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
    vocab_size = engine.model.config.vocab_size

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
    def sampling(req: P._Request, max_tokens: int | None, default: int, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        req.check_supported()
        if max_tokens is not None and max_tokens > settings.max_tokens_cap:
            raise BadRequest(f"max_tokens={max_tokens} exceeds this server's cap of {settings.max_tokens_cap}",
                             param="max_tokens")
        try:
            return SamplingParams(max_tokens=min(default, settings.max_tokens_cap) if max_tokens is None else max_tokens,
                                  temperature=float(req.temperature), top_p=float(req.top_p), stop=req.stop_list(),
                                  seed=req.seed, ignore_eos=req.ignore_eos, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs)
        except SamplingError as exc:
            raise BadRequest(str(exc)) from None

    def fan_out(prompts: list[list[int]], params: SamplingParams, n: int) -> tuple[list[list[int]], list]:
        """Each prompt n times (choice index = prompt index · n + j), choice j seeded by choice_seed(seed, j)."""
        if n * len(prompts) > settings.max_prompts:
            raise BadRequest(f"n × prompts = {n * len(prompts)} sequences; this server runs at most "
                             f"{settings.max_prompts} per request", param="n")
        seeded = [replace(params, seed=choice_seed(params.seed, j)) for j in range(n)]
        return [ids for ids in prompts for _ in range(n)], [seeded[j] for _ in prompts for j in range(n)]

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

    def completion_prompts(prompt) -> tuple[list[list[int]], list[str]]:
        """Token ids of each prompt, and its text (as sent, or decoded from ids) for echo."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if len(prompts) > settings.max_prompts:
            raise BadRequest(f"at most {settings.max_prompts} prompts per request", param="prompt")
        out, texts = [], []
        for p in prompts:
            if isinstance(p, str):
                out.append(tokenizer(p, add_special_tokens=True)["input_ids"])
                texts.append(p)
            else:
                if any(not 0 <= t < vocab_size for t in p):
                    raise BadRequest(f"token ids must be in [0, {vocab_size})", param="prompt")
                out.append(list(p))
                texts.append(tokenizer.decode(p, skip_special_tokens=True))
        return [check_prompt(ids) for ids in out], texts

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
        scored = req.echo and req.logprobs is not None  # prompt logprobs: lm-eval's loglikelihood
        params = sampling(req, req.max_tokens, default=16, logprobs=req.logprobs,
                          prompt_logprobs=req.logprobs if scored else None)
        prompts, prompt_texts = completion_prompts(req.prompt)
        seqs, seq_params = fan_out(prompts, params, req.n)
        choices = [CompletionChoice(tokenizer, ids, prompt_texts[i // req.n], req.echo, req.logprobs)
                   for i, ids in enumerate(seqs)]
        gen = Generation(engine, seqs, adapter, seq_params, settings.request_timeout)
        rid = P.new_id("cmpl")
        prompt_tokens = sum(map(len, prompts))
        if req.stream:  # the first event arrives before the 200: admission errors keep their status
            events = await _started(gen)
            return _stream(_completion_events(gen, events, rid, req.model, req.include_usage, prompt_tokens, choices))
        done = 0
        for i, ev in await _collect(request, gen):
            choices[i].take(ev)
            done += ev.completion_tokens if ev.final else 0
        return P.completion(rid, req.model, [c.result(i) for i, c in enumerate(choices)], prompt_tokens, done)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request, settings)
        req = parse(P.ChatCompletionRequest, await read_json(request, settings.max_body_bytes,
                                                              settings.body_timeout))
        adapter = registry.resolve(req.model)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, req.max_completion_tokens or req.max_tokens, default=settings.max_tokens_cap,
                          logprobs=top)
        ids = chat_prompt(req.messages)
        seqs, seq_params = fan_out([ids], params, req.n)
        choices = [ChatChoice(tokenizer, ids, top) for _ in seqs]
        gen = Generation(engine, seqs, adapter, seq_params, settings.request_timeout)
        rid = P.new_id("chatcmpl")
        if req.stream:
            events = await _started(gen)
            return _stream(_chat_events(gen, events, rid, req.model, req.include_usage, len(ids), choices))
        done = 0
        for i, ev in await _collect(request, gen):
            choices[i].take(ev)
            done += ev.completion_tokens if ev.final else 0
        return P.chat_completion(rid, req.model, [c.result(i) for i, c in enumerate(choices)], len(ids), done)

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


async def _collect(request: Request, gen: Generation) -> list[tuple[int, GenerationEvent]]:
    """All of gen's events (non-streaming). If the client disconnects first, the generation is
    cancelled (its rows leave the batch at the next step) and ClientDisconnected is raised."""

    async def drain() -> list[tuple[int, GenerationEvent]]:
        return [item async for item in gen.events()]

    async def disconnected() -> None:
        # the body is read: the next message is http.disconnect (client gone, or our response sent)
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            gen.cancel()
    if work.cancelled():
        logger.info("client disconnected; cancelled its %d sequence(s)", len(gen.requests))
        raise ClientDisconnected("the client closed the connection before the response was ready")
    return work.result()


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
                             model: str, include_usage: bool, prompt_tokens: int,
                             choices: list[CompletionChoice]) -> AsyncIterator[str]:
    completion_tokens = 0
    try:
        async for i, ev in events:
            echo = choices[i].prefix(ev)
            if echo is not None:
                yield sse(P.completion_chunk(rid, model, i, echo[0], None, echo[1]))
            if ev.text or ev.final:
                yield sse(P.completion_chunk(rid, model, i, ev.text, ev.finish_reason, choices[i].delta(ev)))
            if ev.final:
                completion_tokens += ev.completion_tokens
        if include_usage:
            yield sse(P.usage_chunk(rid, model, "text_completion", prompt_tokens, completion_tokens))
    except ServeError as exc:  # headers are sent: report in the stream, as OpenAI does
        yield sse(exc.body())
    finally:
        gen.cancel()  # client gone or done: free the batch rows
    yield sse("[DONE]")


async def _chat_events(gen: Generation, events: AsyncIterator[tuple[int, GenerationEvent]], rid: str,
                       model: str, include_usage: bool, prompt_tokens: int,
                       choices: list[ChatChoice]) -> AsyncIterator[str]:
    completion_tokens = 0
    try:
        for i in range(len(choices)):
            yield sse(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, index=i))
        async for i, ev in events:
            logprobs = choices[i].delta(ev)
            if ev.text or logprobs:
                yield sse(P.chat_chunk(rid, model, {"content": ev.text}, None, index=i, logprobs=logprobs))
            if ev.final:
                yield sse(P.chat_chunk(rid, model, {}, ev.finish_reason, index=i))
                completion_tokens += ev.completion_tokens
        if include_usage:
            yield sse(P.usage_chunk(rid, model, "chat.completion.chunk", prompt_tokens, completion_tokens))
    except ServeError as exc:
        yield sse(exc.body())
    finally:
        gen.cancel()
    yield sse("[DONE]")
