"""The OpenAI-compatible HTTP API (FastAPI): routes only.

Routes parse a request into a pydantic schema (`schemas.py`), tokenize it, hand it to a
`Session` over the shared `Engine`, and write the answer in the OpenAI wire format, whole or
as server-sent events. Every error is an OpenAI error object with a 4xx status (5xx only for
a failure inside generation); nothing a client sends can stop the process.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health,
GET /metrics (Prometheus text), and vLLM's tokenizer routes GET /tokenizer_info, POST /tokenize,
POST /detokenize (what lm-evaluation-harness's remote tokenizer calls).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from looplm.errors import GenerationError, LooplmError
from looplm.sampling import SamplingParams, logit_bias_pairs
from looplm.server.engine import Engine, QueueFull, TokenLogprob
from looplm.server.logprobs import CompletionLogprobs, chat_logprobs
from looplm.server.metrics import Metrics
from looplm.server.reasoning import Delta
from looplm.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingOptions,
    TokenizeRequest,
    error_body,
)
from looplm.server.session import EngineFailed, Session
from looplm.text import prompt_opens_reasoning
from looplm.tokenizer import Tokenizer

log = logging.getLogger("looplm.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, manage_engine: bool = True) -> FastAPI:
    """The API over a (possibly not yet started) engine; `manage_engine` starts/stops it with the app."""
    model = engine.model
    tokenizer = model.tokenizer
    defaults = model.generation_defaults or {}
    eos_ids = model.stop_ids

    def pick(value: float | None, key: str, fallback: float) -> float:
        """A request's sampling value, else the model's generation config's, else the fallback."""
        return value if value is not None else defaults.get(key, fallback)

    metrics = Metrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            engine.stop()

    app = FastAPI(title="looplm", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    # -- errors, auth, request counting --------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500)

    app.add_middleware(AuthAndCount, api_key=api_key, metrics=metrics, routes=app.router.routes)

    # -- plain endpoints ------------------------------------------------------------------------

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Any:
        if not engine.alive:  # a load balancer must stop sending requests that nothing would answer
            return JSONResponse({"status": "engine stopped", "model": model_name}, status_code=503)
        return {"status": "ok", "model": model_name, "running": engine.running, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    def unknown_model(name: str) -> ApiError:
        return ApiError(404, f"model '{name}' does not exist; this server serves '{model_name}'", param="model",
                        code="model_not_found")

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "looplm",
            "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")  # OpenAI's "retrieve model"; hub ids have a slash
    async def one_model(model_id: str) -> dict:
        if model_id != model_name:
            raise unknown_model(model_id)
        return card

    # -- the tokenizer (vLLM's routes: lm-evaluation-harness's `tokenizer_backend=remote` uses them) --

    def need_tokenizer() -> Tokenizer:
        if tokenizer is None:
            raise ApiError(400, f"model '{model_name}' has no tokenizer, so it cannot take or write text")
        return tokenizer

    # No token is longer than `longest_token_bytes` (doubled for normalizers that merge
    # characters), so a text of more characters than this cannot fit the context. It is refused
    # before tokenizing: the tokenizer holds the GIL, and a 10 MB prompt stalled every stream for 8 s.
    most_chars = None if tokenizer is None else 2 * engine.max_context * (tokenizer.longest_token_bytes + 1)

    def encode(text: str, add_special_tokens: bool, param: str) -> list[int]:
        """A request's text as token ids; a 400 for text that is not valid Unicode or cannot fit."""
        tok = need_tokenizer()
        if most_chars is not None and len(text) > most_chars:
            raise ApiError(400, f"{param}: {len(text)} characters cannot fit the context of {engine.max_context} "
                                f"tokens (at most {most_chars} characters could)", param=param)
        try:
            return tok.encode(text, add_special_tokens)
        except LooplmError as exc:
            raise ApiError(400, f"{param}: {exc}", param=param) from None

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        tok = need_tokenizer()
        return {"tokenizer_class": "looplm", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.pad_token, "chat_template": tok.chat_template, "model_max_length": engine.max_context}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body: TokenizeRequest = await parse_json(request, TokenizeRequest)
        tokens = encode(body.prompt, body.add_special_tokens, "prompt")
        return {"count": len(tokens), "max_model_len": engine.max_context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body: DetokenizeRequest = await parse_json(request, DetokenizeRequest)
        vocab = model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": need_tokenizer().decode(body.tokens, skip_special_tokens=False)}

    # -- generation -----------------------------------------------------------------------------

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        """A generation request: its schema, and a model name this server serves."""
        body = await parse_json(request, schema)
        if body.model is not None and body.model != model_name:
            raise unknown_model(body.model)
        return body

    async def parse_json(request: Request, schema: type[BaseModel]) -> Any:
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own checks
            raise ApiError(400, f"{param}: {message}" if param else message, param=param) from None
        return body

    def start_session(body: SamplingOptions, prompts: list[list[int]], split: bool, in_reasoning: bool,
                      echo_logprobs: bool = False) -> Session:
        sequences = body.n * len(prompts)
        if sequences > engine.max_queue:  # a 429 would invite retries that can never succeed
            raise ApiError(400, f"this request asks for {sequences} sequences (n x prompts); the server queues "
                                f"at most {engine.max_queue} at once (--max-queue)", param="n")
        longest = max(len(p) for p in prompts)
        max_tokens = body.token_budget  # None: each prompt gets the rest of the context
        try:
            engine.check_length(longest, max_tokens)
            loop = engine.loop_config(body.loops, body.exit_policy, body.exit_threshold, body.kv_mode,
                                      body.skip_compute)
            sampling = SamplingParams(
                temperature=pick(body.temperature, "temperature", 1.0), top_p=pick(body.top_p, "top_p", 1.0),
                top_k=pick(body.top_k, "top_k", 0),
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                logit_bias=logit_bias_pairs(body.logit_bias),
                repetition_penalty=pick(body.repetition_penalty, "repetition_penalty", 1.0),
                min_p=pick(body.min_p, "min_p", 0.0),
            )
            stop_ids = frozenset(body.stop_token_ids or [])
            if any(not 0 <= token < model.config.vocab_size for token in stop_ids):
                raise GenerationError(f"stop_token_ids must be token ids in [0, {model.config.vocab_size})")
            session = Session(engine, tokenizer, (frozenset() if body.ignore_eos else eos_ids) | stop_ids, stop_ids)
            session.submit(prompts, body.n, max_tokens, loop, sampling, body.seed, body.stop or [], split, in_reasoning,
                           body.logprob_alternatives, echo_logprobs)
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_exceeded", code="queue_full") from None
        except LooplmError as exc:
            raise ApiError(400, str(exc)) from None
        return session

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        tok = need_tokenizer()
        try:
            messages = [{"role": m.template_role, "content": m.text()} for m in body.messages]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True,
                                                   enable_thinking=body.thinking())
        except (ValueError, LooplmError) as exc:
            raise ApiError(400, str(exc), param="messages") from None
        in_reasoning = body.split_reasoning and prompt_opens_reasoning(prompt)
        session = start_session(body, [encode(prompt, False, "messages")], body.split_reasoning, in_reasoning)
        reply = Reply("chatcmpl", "chat.completion", model_name, tok if body.logprobs else None)
        if body.stream:
            return stream(request, session, reply.chat_chunks(session, body.include_usage))
        return await respond(request, session, reply, reply.chat_message)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionRequest = await parse(request, CompletionRequest)
        tok = need_tokenizer()  # token-id prompts too: the reply is text
        given = body.prompts()
        prompts = [encode(p, True, "prompt") if isinstance(p, str) else list(p) for p in given]
        session = start_session(body, prompts, False, False, echo_logprobs=body.echo and body.logprobs is not None)
        texts = [p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False) for p in given]
        reply = Reply("cmpl", "text_completion", model_name, tok if body.logprobs is not None else None,
                      echoed=[text for text in texts for _ in range(body.n)] if body.echo else None)
        if body.stream:
            return stream(request, session, reply.text_chunks(session, body.include_usage))
        return await respond(request, session, reply, reply.text_choice)

    def stream(request: Request, session: Session, chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
                metrics.record_usage(session.prompt_tokens, session.usage()["completion_tokens"])
            except EngineFailed as exc:
                yield f"data: {json.dumps(error_body(str(exc), 'server_error'))}\n\n"
            finally:  # also on client disconnect (the task is cancelled): free the rows
                session.close()
            yield "data: [DONE]\n\n"

        # The background task also frees the rows when the client left before the first chunk.
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(session.close),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def respond(request: Request, session: Session, reply: Reply, make_choice) -> JSONResponse:  # noqa: ANN001
        parts: dict[int, Any] = {}
        finish: dict[int, str] = {}
        logprobs: dict[int, list[TokenLogprob]] = {c.index: [] for c in session.choices}
        try:
            async for index, delta, reason, token_logprobs in session.deltas(request.is_disconnected):
                part = parts.setdefault(index, Delta())
                part += delta
                logprobs[index] += token_logprobs
                if reason is not None:
                    finish[index] = reason
        except EngineFailed as exc:
            raise ApiError(500, str(exc), "server_error") from None
        finally:
            session.close()
        if len(finish) < len(session.choices):  # the client went away; nobody reads this
            return JSONResponse(error_body("client disconnected"), status_code=499)
        usage = session.usage()
        metrics.record_usage(usage["prompt_tokens"], usage["completion_tokens"])
        choices = [make_choice(c.index, parts.get(c.index), finish[c.index], c.text.saw_reasoning, logprobs[c.index])
                   for c in session.choices]
        return JSONResponse(reply.whole(choices, usage))

    return app


class AuthAndCount:
    """ASGI middleware: the API key check on /v1/*, and request counts by route and status.

    Plain ASGI rather than `@app.middleware("http")`: that wrapper hides client disconnects
    from `Request.is_disconnected`, which non-streaming requests poll to cancel their rows.
    """

    def __init__(self, app, api_key: str | None, metrics: Metrics, routes: list) -> None:  # noqa: ANN001
        self.app, self.api_key, self.metrics, self.routes = app, api_key, metrics, routes

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        route = route_label(self.routes, scope)
        if self.api_key:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            # The scheme is case-insensitive (RFC 9110), the key is not.
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.api_key.encode()):
                self.metrics.record_request(route, 401)
                body = error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                  "authentication_error", code="invalid_api_key")
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        status = 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.record_request(route, status)


def route_label(routes: list, scope: dict) -> str:
    """The path template of the route a request matches (`/v1/models/{model_id:path}`), else
    "other": metric labels must not grow with whatever paths clients send."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:  # FULL, or PARTIAL: the path matches, the method does not (a 405)
            return route.path
    return "other"


class Reply:
    """OpenAI response objects for one request (ids, timestamps, chunk shapes). `tokenizer` is
    given when the request asked for log-probabilities, which it spells out as token texts."""

    def __init__(self, prefix: str, obj: str, model: str, tokenizer: Tokenizer | None = None,
                 echoed: list[str] | None = None) -> None:
        self.id, self.object, self.model = f"{prefix}-{uuid.uuid4().hex}", obj, model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self._completion_logprobs: dict[int, CompletionLogprobs] = {}  # per choice: text offsets run on
        self._echo = dict(enumerate(echoed or []))  # choice index -> its prompt, until written out once

    def with_echo(self, index: int, text: str) -> str:
        """A completion's text, after its prompt the first time the choice writes (`echo`)."""
        return self._echo.pop(index, "") + text

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        return None if self.tokenizer is None else chat_logprobs(self.tokenizer, entries)

    def text_logprobs(self, index: int, entries: list[TokenLogprob]) -> dict | None:
        if self.tokenizer is None:
            return None
        return self._completion_logprobs.setdefault(index, CompletionLogprobs(self.tokenizer)).next(entries)

    def chat_message(self, index: int, delta, finish: str, saw_reasoning: bool,  # noqa: ANN001
                     logprobs: list[TokenLogprob]) -> dict:
        reasoning = delta.reasoning.strip() if delta is not None else ""
        content = delta.content if delta is not None else ""
        if saw_reasoning:
            content = content.lstrip()
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": self.chat_logprobs(logprobs)}

    def text_choice(self, index: int, delta, finish: str, saw_reasoning: bool,  # noqa: ANN001
                    logprobs: list[TokenLogprob]) -> dict:
        text = self.with_echo(index, delta.content if delta is not None else "")
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": self.text_logprobs(index, logprobs)}

    def whole(self, choices: list[dict], usage: dict) -> dict:
        return {**self.head(self.object), "choices": choices, "usage": usage}

    async def chat_chunks(self, session: Session, include_usage: bool) -> AsyncIterator[dict]:
        head = self.head("chat.completion.chunk")
        no_usage = {"usage": None} if include_usage else {}  # OpenAI's chunks before the usage chunk
        for choice in session.choices:
            yield {**head, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}], **no_usage}
        async for index, delta, reason, logprobs in session.deltas():
            body: dict[str, Any] = {}
            if delta.reasoning:
                body["reasoning_content"] = delta.reasoning
            if delta.content:
                body["content"] = delta.content
            yield {**head, "choices": [{"index": index, "delta": body, "finish_reason": reason,
                                        "logprobs": self.chat_logprobs(logprobs)}], **no_usage}
        if include_usage:
            yield {**head, "choices": [], "usage": session.usage()}

    async def text_chunks(self, session: Session, include_usage: bool) -> AsyncIterator[dict]:
        head = self.head(self.object)
        no_usage = {"usage": None} if include_usage else {}
        async for index, delta, reason, logprobs in session.deltas():
            yield {**head, "choices": [{"index": index, "text": self.with_echo(index, delta.content),
                                        "finish_reason": reason, "logprobs": self.text_logprobs(index, logprobs)}],
                   **no_usage}
        if include_usage:
            yield {**head, "choices": [], "usage": session.usage()}
