"""An OpenAI-compatible HTTP server over SparseLlama: /v1/chat/completions, /v1/completions (server-sent
events ending with `data: [DONE]` when stream=true) and /v1/models.

Built on FastAPI + uvicorn + sse-starlette, the stack llama-cpp-python's own server uses, and shaped like it:
a thin layer over the Python API. Needs the `server` extra (pip install 'sparse-gguf[server]').

Under load:
- one generation at a time (the model has one KV cache); up to `max_queue` requests wait their turn, and
  a request beyond that, or one that waits longer than `queue_timeout` seconds, gets 503;
- request bodies over `max_body_bytes` get 413; `max_tokens` above `max_tokens_cap` (or absent) is clamped
  to the cap; a generation stops after `request_timeout` seconds (finish_reason "length"); a streaming
  client that does not read for `request_timeout` seconds is dropped;
- malformed JSON and invalid fields get 400 with an OpenAI-style error body; other failures 500;
- SIGTERM or SIGINT: stop accepting, end open streams at their next token (a final chunk, finish_reason
  "length", then [DONE]), exit 0.
"""

# no `from __future__ import annotations`: FastAPI must see the request models defined inside create_app

import asyncio
import contextlib
import json
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Union

from .api import SparseLlama
from .default_model import resolve_model_path
from .errors import SparseGGUFError
from .options import DEFAULT_CTX, EngineOptions
from .threads import set_threads


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_tokens_cap: int = 1024        # max_tokens above this (or absent) is clamped to it
    max_queue: int = 8                # requests that may wait while one generates; more get 503
    queue_timeout: float = 60.0       # seconds a request may wait for its turn before 503
    request_timeout: float = 300.0    # seconds a generation may run; also the slow-reader send timeout
    max_body_bytes: int = 1 << 20     # larger request bodies get 413
    log_level: str = "warning"


class Admission:
    """Counts requests inside the server (generating or waiting); refuses beyond 1 + max_queue."""

    def __init__(self, max_queue: int):
        self.limit = 1 + max_queue
        self.inside = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self.inside >= self.limit:
                return False
            self.inside += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.inside = max(0, self.inside - 1)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class BodyLimit:
    """ASGI middleware: reads the request body up to `limit` bytes and answers 413 past it (whether or not
    the client sent Content-Length), then hands the buffered body to the app."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _reject(self, send) -> None:
        body = json.dumps(error_body(f"request body larger than {self.limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._reject(send)
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            total += len(body)
            if total > self.limit:
                return await self._reject(send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        buffered = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return buffered
            return await receive()

        await self.app(scope, replay, send)


def create_app(llm, settings: ServerSettings, model_id: str, n_threads: int | None = None):
    """The FastAPI app serving `llm` (a SparseLlama, or anything with its two create_* methods) on n_threads
    Numba threads (None: physical cores)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from sse_starlette.sse import EventSourceResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException


    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")   # unknown OpenAI fields are ignored, as OpenAI's server does
        model: Optional[str] = None
        max_tokens: Optional[int] = None
        temperature: float = Field(0.8, ge=0.0, le=100.0)
        top_p: float = Field(0.95, gt=0.0, le=1.0)
        top_k: int = Field(40, ge=0)
        min_p: float = Field(0.05, ge=0.0, le=1.0)
        repeat_penalty: float = Field(1.0, gt=0.0)
        seed: Optional[int] = None
        mirostat_mode: Literal[0, 2] = 0
        mirostat_tau: float = Field(5.0, gt=0.0)
        mirostat_eta: float = Field(0.1, gt=0.0)
        top_h: float = Field(0.0, ge=0.0, le=1.0)
        stop: Optional[Union[str, list[str]]] = None
        stream: bool = False
        n: Literal[1] = 1

    class CompletionRequest(Sampling):
        prompt: Union[str, list[int]] = ""
        max_tokens: Optional[int] = 16
        echo: bool = False

    class ChatMessage(BaseModel):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: Optional[Union[str, list[dict]]] = None

    class ChatRequest(Sampling):
        messages: list[ChatMessage] = Field(min_length=1)
        max_completion_tokens: Optional[int] = None

    executor = ThreadPoolExecutor(1, thread_name_prefix="generate", initializer=set_threads,
                                  initargs=(n_threads,))   # Numba's thread count is per thread
    admission = Admission(settings.max_queue)
    model_lock = asyncio.Lock()
    app = FastAPI(title="sparse-gguf", version="0.1.0")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            err = (first.get("ctx") or {}).get("error", "")
            return JSONResponse(error_body(f"malformed JSON: {err}".rstrip(": ")), status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        return JSONResponse(error_body(f"{where}: {msg}" if where else msg, param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "not_found_error" if exc.status_code == 404
                                       else "invalid_request_error"), status_code=exc.status_code)

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_id, "object": "model", "owned_by": "me", "permissions": []}]}

    def clamp(max_tokens: int | None) -> int:
        if max_tokens is None or max_tokens <= 0:
            return settings.max_tokens_cap
        return min(max_tokens, settings.max_tokens_cap)

    def sampling_kwargs(req: Sampling) -> dict:
        return dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                    repeat_penalty=req.repeat_penalty, seed=req.seed, mirostat_mode=req.mirostat_mode,
                    mirostat_tau=req.mirostat_tau, mirostat_eta=req.mirostat_eta, top_h=req.top_h,
                    stop=req.stop, stream=req.stream, model=model_id)

    async def generate(fn, kwargs: dict, stream: bool):
        if not admission.try_enter():
            return JSONResponse(error_body("server busy: the request queue is full, retry later",
                                           "server_error"), status_code=503, headers={"Retry-After": "1"})
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                if model_lock.locked():
                    model_lock.release()
                admission.leave()

        try:
            await asyncio.wait_for(model_lock.acquire(), settings.queue_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            admission.leave()
            return JSONResponse(error_body("server busy: timed out waiting in the queue", "server_error"),
                                status_code=503, headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        t_end = time.monotonic() + settings.request_timeout
        stop_now = threading.Event()          # set on server shutdown: the stream ends at the next token
        kwargs["deadline"] = lambda: stop_now.is_set() or time.monotonic() > t_end
        try:
            result = await loop.run_in_executor(executor, partial(fn, **kwargs))
        except SparseGGUFError as e:        # bad options, prompt too long for the context
            release()
            return JSONResponse(error_body(str(e)), status_code=400)
        except Exception as e:
            release()
            return JSONResponse(error_body(f"{type(e).__name__}: {e}", "server_error"), status_code=500)
        if not stream:
            release()
            return JSONResponse(result)

        shutdown = anyio.Event()              # sse-starlette sets it when uvicorn begins its shutdown

        async def events():
            it = result
            try:
                while True:
                    if shutdown.is_set():
                        stop_now.set()        # finish with a final chunk and [DONE] rather than a cut
                    chunk = await loop.run_in_executor(executor, next, it, None)
                    if chunk is None:
                        break
                    yield json.dumps(chunk)
                yield "[DONE]"
            except SparseGGUFError as e:
                yield json.dumps(error_body(str(e)))
            finally:
                executor.submit(it.close)   # runs on the model thread before any later request's work
                release()

        return EventSourceResponse(events(), sep="\n", send_timeout=settings.request_timeout,
                                   shutdown_event=shutdown, shutdown_grace_period=3.0,
                                   background=BackgroundTask(release))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        kwargs = sampling_kwargs(req)
        kwargs.update(prompt=req.prompt, max_tokens=clamp(req.max_tokens), echo=req.echo)
        return await generate(llm.create_completion, kwargs, req.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        kwargs = sampling_kwargs(req)
        kwargs.update(messages=[m.model_dump() for m in req.messages],
                      max_tokens=clamp(req.max_completion_tokens or req.max_tokens))
        return await generate(llm.create_chat_completion, kwargs, req.stream)

    app.state.admission = admission
    app.state.executor = executor
    return app


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise SparseGGUFError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model: str | Path | None, settings: ServerSettings,
          engine: EngineOptions = EngineOptions(n_ctx=DEFAULT_CTX)) -> None:
    """Load the model with the engine's knobs and serve it until SIGTERM/SIGINT."""
    try:
        import uvicorn
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
    except ImportError as e:
        raise SparseGGUFError(f"the server needs its extra: pip install 'sparse-gguf[server]' ({e.name} missing)") from None

    for name, value in (("max_tokens_cap", settings.max_tokens_cap), ("max_body_bytes", settings.max_body_bytes)):
        if value < 1:
            raise SparseGGUFError(f"{name} must be at least 1")
    if settings.max_queue < 0:
        raise SparseGGUFError("max_queue must be >= 0")
    path = resolve_model_path(model)
    _check_port(settings.host, settings.port)
    llm = SparseLlama(path, verbose=False, **asdict(engine))      # the drop-in's keywords are the options' fields
    app = create_app(llm, settings, path.name, engine.n_threads)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGTERM after its graceful shutdown, so the process would end "killed by
            # signal"; a server stopped on request has exited cleanly, so handle the signals without that.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    config = uvicorn.Config(BodyLimit(app, settings.max_body_bytes), host=settings.host, port=settings.port,
                            log_level=settings.log_level, timeout_graceful_shutdown=5, lifespan="off")
    print(f"sparse-gguf: serving {path.name} on http://{settings.host}:{settings.port}/v1 "
          f"(ctx {llm.n_ctx()}, queue {settings.max_queue}, max_tokens cap {settings.max_tokens_cap})",
          file=sys.stderr, flush=True)
    Server(config).run()
    app.state.executor.shutdown(wait=True, cancel_futures=True)
    print("sparse-gguf: server stopped", file=sys.stderr, flush=True)
