"""The OpenAI-compatible app: `create_app(model, tokenizer, ...) -> FastAPI`.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, and vLLM's
/tokenizer_info, /tokenize and /detokenize (what lm-eval's `local-completions` reads to tokenize as the
server does). Every request decodes in the one continuous batch (serve/scheduler.py). Streams follow the
contract the `openai` client and llama.cpp's server keep: one id across the chunks, the role in the first
delta, `finish_reason` in the finishing chunk, then a usage chunk with empty choices when
`stream_options.include_usage` asks for one, then `data: [DONE]`. A chat reply's think block goes out
as `reasoning_content`, never inside `content`. Errors have OpenAI's JSON shape; a malformed request is
a 400 (never a 500), a missing or wrong `--api-key` a 401."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from darkhorse.errors import DarkhorseError
from darkhorse.infer.engine import Engine, Row
from darkhorse.infer.generate import ANSWER, ReplySplitter, TextDelta
from darkhorse.infer.prompting import chat_stop_ids, encode_chat_prompt, prompt_opens_think
from darkhorse.infer.sampling import SamplingOptions
from darkhorse.serve.scheduler import END, TOKEN, Scheduler, Ticket
from darkhorse.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Detokenized,
    DetokenizeRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizerInfo,
    Tokens,
)
from darkhorse.serve.text import StopText

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; a chat reply may run to the end of the context
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "a malformed or impossible request"},
    401: {"model": ErrorResponse, "description": "a missing or wrong API key"},
}
STREAMED = {"content": {"text/event-stream": {}}, "description": "the reply, or with `stream` its server-sent events"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


class Server:
    """The model, its tokenizer and the scheduler, and the requests' text in and out."""

    def __init__(self, model, tokenizer, *, model_name: str, max_batch: int) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context = model.config.max_seq_len
        self.scheduler = Scheduler(Engine(model, tokenizer.vocab_size), max_batch)
        self.created = int(time.time())

    def check_prompt(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty: give at least one token", param="prompt")
        if len(ids) >= self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context is {self.context}")
        if max(ids) >= self.tokenizer.vocab_size:
            raise ApiError(400, f"token id {max(ids)} is not in the vocabulary (size {self.tokenizer.vocab_size})")
        return ids

    def row(self, ids: list[int], body, stop_ids: set[int], default_max_tokens: int, **extra) -> Row:
        """The engine's row for a request; unset options take OpenAI's defaults (temperature 1, top_p 1)."""
        options = SamplingOptions(
            max_new_tokens=default_max_tokens if body.max_tokens is None else body.max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=body.seed,
            stop_ids=stop_ids,
        )
        return Row(ids, options, **extra)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    async def tokens(self, ticket: Ticket) -> AsyncIterator[int]:
        """The row's tokens as they are decoded; its finish reason is on the row once this ends."""
        while True:
            kind, value = await ticket.events.get()
            if kind == TOKEN:
                yield value
            elif kind == END:
                return
            else:
                raise ApiError(500, str(value), kind="server_error")


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def stops(body) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


async def until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is read by then, so only a disconnect arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work) -> Any:
    """`await work`, cancelled (its rows freed) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ApiError(499, "the client closed the connection")
    return task.result()


class Completer:
    """One prompt of a /v1/completions request, decoded in the batch."""

    def __init__(self, server: Server, ids: list[int], body: CompletionRequest) -> None:
        self.server, self.ids, self.body = server, ids, body
        self.scored = bool(body.echo) and body.logprobs is not None
        row = server.row(ids, body, {server.tokenizer.eos_id}, DEFAULT_MAX_TOKENS, logprobs=body.logprobs,
                         prompt_logprobs=self.scored)  # fmt: skip
        self.ticket = server.scheduler.submit(row)
        self.stop_text = StopText(stops(body))
        self.delta = TextDelta(server.tokenizer)
        self.count = 0  # tokens taken (the stop id included)
        self.finish_reason: str | None = None

    async def pieces(self) -> AsyncIterator[str]:
        """The completion's text as it comes (the echoed prompt first); `finish_reason` is set at the end."""
        try:
            if self.body.echo:
                yield self.server.tokenizer.decode(self.ids)
            async for token in self.server.tokens(self.ticket):
                self.count += 1
                if token in self.ticket.row.options.stop_ids:
                    continue
                piece = self.stop_text.push(self.delta.push(token))
                if piece:
                    yield piece
                if self.stop_text.stopped:
                    self.finish_reason = "stop"
                    return
            tail = self.stop_text.flush()
            if tail:
                yield tail
            self.finish_reason = self.ticket.row.finish_reason
        finally:
            self.server.scheduler.cancel(self.ticket)

    def logprobs(self) -> dict | None:
        row = self.ticket.row
        if row.logprobs is None:
            return None
        ids = row.tokens[: self.count]
        token_logprobs: list[float | None] = list(row.token_logprobs[: self.count])
        tops: list[list[tuple[int, float]] | None] = list(row.top_logprobs[: self.count])
        if self.body.echo:
            ids = self.ids + ids
            token_logprobs = row.prompt_token_logprobs + token_logprobs
            tops = row.prompt_top_logprobs + tops
        texts = [self.server.token_text(i) for i in ids]
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        top_dicts = [None if top is None else self._top_dict(top) for top in tops]
        return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": top_dicts, "text_offset": offsets}

    def _top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        named: dict[str, float] = {}
        for token_id, logprob in top:
            text = self.server.token_text(token_id)
            named[text] = max(logprob, named.get(text, float("-inf")))
        return named


def create_app(
    model, tokenizer, *, model_name: str = "darkhorse", max_batch: int = 8, api_key: str | None = None
) -> FastAPI:
    """The server app for `model` and its `tokenizer`: up to `max_batch` requests decode together; with
    `api_key`, every endpoint but /health (and the page at /) wants `Authorization: Bearer KEY`."""
    server = Server(model, tokenizer, model_name=model_name, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.scheduler.close()

    # no /docs or /redoc pages: they load their scripts from a CDN; the schema is at /openapi.json
    app = FastAPI(title="darkhorse", description=__doc__, version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", kind="authentication_error")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(DarkhorseError)
    async def darkhorse_error(request: Request, exc: DarkhorseError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(400, message, "invalid_request_error", where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health()

    api = APIRouter(dependencies=[Depends(check_key)], responses=ERRORS)

    @api.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=server.model_name, created=server.created)])

    @api.post("/v1/completions", response_model=Completion, responses={200: STREAMED})
    async def completions(body: CompletionRequest, request: Request):
        batched = isinstance(body.prompt, list) and not isinstance(body.prompt[0], int)
        prompts = body.prompt if batched else [body.prompt]
        # text is text: `<|user|>` written in a prompt never becomes a control token (token ids can hold any)
        ids = [server.check_prompt(tokenizer.encode_text(p) if isinstance(p, str) else list(p)) for p in prompts]
        if body.stream and len(ids) > 1:
            raise ApiError(400, "a streamed completion takes one prompt", param="prompt")
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "object": "text_completion", "created": created, "model": server.model_name}
        if body.stream:
            completer = Completer(server, ids[0], body)
            return stream(completer.pieces(), completer, lambda piece: {"index": 0, "text": piece, "logprobs": None},
                          head, body, len(ids[0]))  # fmt: skip

        async def run(completer: Completer) -> dict:
            text = "".join([piece async for piece in completer.pieces()])
            return {"text": text, "logprobs": completer.logprobs(), "finish_reason": completer.finish_reason}

        completers = [Completer(server, prompt, body) for prompt in ids]
        try:
            choices = await unless_disconnected(request, asyncio.gather(*(run(c) for c in completers)))
        finally:
            for completer in completers:
                server.scheduler.cancel(completer.ticket)
        counted = usage(sum(map(len, ids)), sum(c.count for c in completers))
        return {**head, "choices": [{"index": i, **choice} for i, choice in enumerate(choices)], "usage": counted}

    @api.post("/v1/chat/completions", response_model=ChatCompletion, responses={200: STREAMED})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = []
        for message in body.messages:
            content = message.content if isinstance(message.content, str) or message.content is None else (
                "".join(part.text for part in message.content))  # fmt: skip
            entry = {"role": message.role, "content": content or ""}
            if message.reasoning_content:
                entry["reasoning_content"] = message.reasoning_content
            messages.append(entry)
        think = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else True
        prompt, ids = encode_chat_prompt(tokenizer, messages, think=think)  # message text cannot forge markup
        ids = server.check_prompt(ids)
        reply = ChatReply(server, ids, body, opened_think=prompt_opens_think(prompt))
        chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
        if body.stream:
            return stream(reply.deltas(), reply, lambda delta: {"index": 0, "delta": delta}, head, body, len(ids),
                          first={"index": 0, "delta": {"role": "assistant", "content": ""}})  # fmt: skip

        async def run() -> dict[str, str]:
            parts: dict[str, str] = {"content": "", "reasoning_content": ""}
            async for delta in reply.deltas():
                for key, text in delta.items():
                    parts[key] += text
            return parts

        try:
            parts = await unless_disconnected(request, run())
        finally:
            server.scheduler.cancel(reply.ticket)
        reasoning = parts["reasoning_content"] or None
        message = {"role": "assistant", "content": parts["content"], "reasoning_content": reasoning}
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(len(ids), reply.count)}

    @api.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info() -> TokenizerInfo:
        return TokenizerInfo(eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token,
                             pad_token=tokenizer.pad_token, model_max_length=server.context)  # fmt: skip

    @api.post("/tokenize", response_model=Tokens)
    async def tokenize(body: TokenizeRequest) -> Tokens:
        ids = tokenizer.encode_text(body.prompt)  # as /v1/completions encodes a text prompt
        return Tokens(tokens=ids, count=len(ids), max_model_len=server.context)

    @api.post("/detokenize", response_model=Detokenized)
    async def detokenize(body: DetokenizeRequest) -> Detokenized:
        if body.tokens and max(body.tokens) >= tokenizer.vocab_size:
            raise ApiError(400, f"token id {max(body.tokens)} is not in the vocabulary", param="tokens")
        return Detokenized(prompt=tokenizer.decode(body.tokens))

    app.include_router(api)
    app.openapi = lambda: _declared_schema(app)
    if STATIC_DIR.is_dir():
        app.mount("/", _PageFiles(directory=STATIC_DIR, html=True), name="static")
    return app


class _PageFiles(StaticFiles):
    """The web page's files at `/`. The mount sees every path no route took: a POST to an unknown path is the
    API's 404 in OpenAI's shape, not the file server's 405."""

    async def get_response(self, path: str, scope: Any) -> Any:
        if scope["method"] not in ("GET", "HEAD"):
            raise HTTPException(status_code=404, detail=f"no such endpoint: {scope['method']} {scope['path']}")
        return await super().get_response(path, scope)


def _declared_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI schema without the 422 it declares by default: invalid requests are 400s here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


class ChatReply:
    """A chat completion decoded in the batch: its deltas, reasoning and answer apart."""

    def __init__(self, server: Server, ids: list[int], body: ChatCompletionRequest, *, opened_think: bool) -> None:
        self.server, self.body = server, body
        self.ticket = server.scheduler.submit(server.row(ids, body, chat_stop_ids(server.tokenizer), server.context))
        self.splitter = ReplySplitter(server.tokenizer, opened_think=opened_think)
        self.stop_text = StopText(stops(body))
        self.count = 0
        self.finish_reason: str | None = None

    async def deltas(self) -> AsyncIterator[dict[str, str]]:
        """{"content": text} or {"reasoning_content": text} as the reply comes; `finish_reason` set at the end."""
        try:
            async for token in self.server.tokens(self.ticket):
                self.count += 1
                piece = self.splitter.push(token)
                if piece is None:
                    continue
                part, text = piece
                if part != ANSWER:
                    yield {"reasoning_content": text}
                    continue
                text = self.stop_text.push(text)
                if text:
                    yield {"content": text}
                if self.stop_text.stopped:
                    self.finish_reason = "stop"
                    return
            tail = self.stop_text.flush()
            if tail:
                yield {"content": tail}
            self.finish_reason = self.ticket.row.finish_reason
        finally:
            self.server.scheduler.cancel(self.ticket)


def stream(
    items: AsyncIterator,
    source,
    choice: Callable[[Any], dict],
    head: dict,
    body,
    prompt_tokens: int,
    first: dict | None = None,
) -> StreamingResponse:
    """Server-sent events: a chunk per item (after `first`), the finishing chunk, the usage chunk when
    asked for, then [DONE]. Leaving early (a disconnect) closes `items`, which frees the row."""
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if with_usage else {}

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield sse({**head, "choices": [{**first, "finish_reason": None}], **extra})
            async for item in items:
                yield sse({**head, "choices": [{**choice(item), "finish_reason": None}], **extra})
            end = {**choice(""), "finish_reason": source.finish_reason}
            if "delta" in end:
                end["delta"] = {}
            yield sse({**head, "choices": [end], **extra})
            if with_usage:
                yield sse({**head, "choices": [], "usage": usage(prompt_tokens, source.count)})
            yield sse("[DONE]")
        finally:
            await items.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
