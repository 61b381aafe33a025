"""The OpenAI-compatible HTTP app behind ``afm_mlx.server`` (Starlette).

``parse_request`` turns a request body into a ``Job`` (or a ``RequestError``: a 4xx with an
OpenAI-style JSON error), ``Worker`` runs jobs one at a time on the thread that owns the model
(``Generator``), reusing the KV cache of a prompt prefix under the same adapter, and ``build_app``
routes ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request the client got wrong: an HTTP status and an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        kind = "authentication_error" if self.status == 401 else kind
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }


# --- request parsing ------------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise RequestError(400, f"'{name}' must be in [{low}, {high}]", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{name}' must be an integer", name)
    if not low <= value <= high:
        raise RequestError(400, f"'{name}' must be in [{low}, {high}]", name)
    return value


@dataclass
class Job:
    """One generation request, parsed and checked; the worker fills ``events``."""

    adapter: str | None  # the adapter NAME, or None for the base
    model_id: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    chat: bool
    events: asyncio.Queue = field(default=None)  # type: ignore[assignment]
    loop: asyncio.AbstractEventLoop | None = None

    def emit(self, kind: str, payload: Any) -> None:
        """Called from the worker thread: hand an event to the request's event loop."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (the server's ``--max-*`` flags)."""

    max_tokens_limit: int  # the largest max_tokens
    default_max_tokens: int  # max_tokens of a request that gives none
    max_prompt_tokens: int
    max_body_bytes: int


def parse_request(
    body: Any, chat: bool, limits: RequestLimits, models: dict[str, str | None]
) -> Job:
    """Check a completions / chat completions request body; raises ``RequestError``."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model_id = body.get("model")
    if not isinstance(model_id, str):
        raise RequestError(400, "'model' is required: the base or an adapter name", "model")
    if model_id not in models:
        raise RequestError(
            404,
            f"model '{model_id}' does not exist; available: {', '.join(models)}",
            "model",
            "model_not_found",
        )
    prompt = messages = None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise RequestError(400, f"each message needs a role in {ROLES}", "messages")
            if not isinstance(m.get("content"), str):
                raise RequestError(400, "each message needs a 'content' string", "messages")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    _integer(body, "n", 1, 1, 1)  # only n=1 is served: anything else is refused
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream")
    tokens_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return Job(
        adapter=models[model_id],
        model_id=model_id,
        prompt=prompt,
        messages=messages,
        max_tokens=_integer(
            body, tokens_field, limits.default_max_tokens, 1, limits.max_tokens_limit
        ),  # type: ignore[arg-type]
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        stop=stop,
        stream=stream,
        chat=chat,
    )


# --- the worker: the only thread that touches the model -------------------------------------------


class StopScanner:
    """Text released as it is produced, holding back what could be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent = stops, "", 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, piece: str) -> tuple[str, bool]:
        """(text that may be sent now, whether a stop string ended the completion)."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = max(self.sent, len(self.text) - self.hold), False
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out, stopped

    def rest(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


class Worker:
    """Loads the model, then serves jobs from a bounded queue one at a time."""

    def __init__(
        self,
        model: str,
        adapters: dict[str, Path],
        dense_cache: str,
        max_queue: int,
        max_prompt_tokens: int,
    ):
        self.model, self.adapter_dirs, self.dense_cache = model, adapters, dense_cache
        self.max_prompt_tokens = max_prompt_tokens
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="afm-generate", daemon=True)
        self.gen = None

    def start(self) -> None:
        self.thread.start()
        self.ready.wait()
        if self.failure is not None:
            raise self.failure

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, "the server is busy; retry later", code="queue_full") from None

    def _run(self) -> None:
        try:
            from afm_mlx.inference.generator import Generator

            self.gen = Generator(self.model, self.dense_cache)
            for folder in self.adapter_dirs.values():
                self.gen.adapters.get(folder)  # read and check each adapter once, up front
        except BaseException as e:  # reported by start() in the main thread
            self.failure = e
            self.ready.set()
            return
        self.ready.set()
        while True:
            job = self.jobs.get()
            try:
                self._generate(job)
            except RequestError as e:
                job.emit("error", e)
            except Exception as e:  # a bug or resource problem: the request fails, serving goes on
                job.emit("error", RequestError(500, f"generation failed: {e}"))

    def _generate(self, job: Job) -> None:
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        gen = self.gen
        tokens = gen.chat_tokens(job.messages) if job.chat else gen.prompt_tokens(job.prompt, False)
        if not tokens:
            raise RequestError(400, "the prompt is empty once tokenized", "prompt")
        if len(tokens) > self.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt has {len(tokens)} tokens; this server accepts at most "
                f"{self.max_prompt_tokens}",
                "messages" if job.chat else "prompt",
                "context_length_exceeded",
            )
        gen.use(None if job.adapter is None else self.adapter_dirs[job.adapter])
        mx.random.seed(job.seed if job.seed is not None else time.time_ns() % (2**32))
        sampler = make_sampler(temp=job.temperature, top_p=job.top_p if job.top_p < 1 else 0.0)
        scanner, finish, count = StopScanner(job.stop), "length", 0
        for response in gen.stream_tokens(tokens, job.max_tokens, sampler, reuse_prefix=True):
            count = response.generation_tokens
            if response.finish_reason == "stop":  # end of sequence: its text is empty
                finish = "stop"
            text, stopped = scanner.add(response.text)
            if text:
                job.emit("text", text)
            if stopped:
                finish = "stop"
                break
        else:
            tail = scanner.rest()
            if tail:
                job.emit("text", tail)
        usage = {
            "prompt_tokens": len(tokens),
            "completion_tokens": count,
            "total_tokens": len(tokens) + count,
            "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
        }
        job.emit("done", (finish, usage))


# --- the HTTP application -------------------------------------------------------------------------


def build_app(worker: Worker, base_id: str, limits: RequestLimits, api_key: str | None = None):
    """The Starlette application (``worker`` must be started before requests arrive); with
    ``api_key``, every request must carry it as a bearer token."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    models: dict[str, str | None] = {base_id: None, "base": None}
    models.update({name: name for name in worker.adapter_dirs})
    created = int(time.time())

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def authorized(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise RequestError(401, "a valid API key is required (Authorization: Bearer KEY)")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and (
            not declared.isdigit() or int(declared) > limits.max_body_bytes
        ):
            raise RequestError(413, f"the request body exceeds {limits.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise RequestError(413, f"the request body exceeds {limits.max_body_bytes} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e})") from None

    async def list_models(request: Request):
        try:
            authorized(request)
        except RequestError as e:
            return error(e)
        names = [base_id, *worker.adapter_dirs]
        data = [
            {"id": n, "object": "model", "created": created, "owned_by": "afm_mlx"} for n in names
        ]
        return JSONResponse({"object": "list", "data": data})

    async def events(job: Job) -> AsyncIterator[tuple[str, Any]]:
        while True:
            kind, payload = await job.events.get()
            yield kind, payload
            if kind in ("done", "error"):
                return

    def handler(chat: bool) -> Callable:
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = {"content": text} if text is not None else {}
            if delta:
                return {"index": 0, "delta": body, "finish_reason": finish}
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text or ""},
                "finish_reason": finish,
            }

        async def endpoint(request: Request):
            try:
                authorized(request)
                job = parse_request(await read_json(request), chat, limits, models)
                job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
                worker.submit(job)
            except RequestError as e:
                return error(e)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            head = {"id": rid, "created": int(time.time()), "model": job.model_id}
            if not job.stream:
                parts = []
                async for ev, payload in events(job):
                    if ev == "text":
                        parts.append(payload)
                    elif ev == "error":
                        return error(payload)
                    else:
                        finish, usage = payload
                body = {**head, "object": kind, "choices": [choice("".join(parts), finish, False)]}
                return JSONResponse({**body, "usage": usage})

            first = await job.events.get()  # an error before any text is still a 4xx/5xx
            if first[0] == "error":
                return error(first[1])

            async def sse() -> AsyncIterator[str]:
                chunk_kind = f"{kind}.chunk" if chat else kind
                if chat:
                    role = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                    yield _sse({**head, "object": chunk_kind, "choices": [role]})
                pending = [first]
                while True:
                    ev, payload = pending.pop() if pending else await job.events.get()
                    if ev == "text":
                        yield _sse(
                            {**head, "object": chunk_kind, "choices": [choice(payload, None, True)]}
                        )
                    elif ev == "error":
                        yield _sse(payload.body())
                        break
                    else:
                        finish, usage = payload
                        last = {
                            **head,
                            "object": chunk_kind,
                            "choices": [choice(None, finish, True)],
                        }
                        yield _sse({**last, "usage": usage})
                        break
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        return endpoint

    async def health(request: Request):
        return JSONResponse({"status": "ok", "queued": worker.jobs.qsize()})

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/completions", handler(chat=False), methods=["POST"]),
        Route("/v1/chat/completions", handler(chat=True), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]

    async def not_found(request, exc):
        return error(RequestError(404, f"no such endpoint: {request.url.path}"))

    async def not_allowed(request, exc):
        return error(RequestError(405, f"{request.method} is not allowed on {request.url.path}"))

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"
