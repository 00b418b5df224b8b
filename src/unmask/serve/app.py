"""The HTTP application: endpoints, the error shape, the body limit, event streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import ConfigError
from ..pipeline import from_pretrained
from .service import (
    Busy,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelService,
    RequestError,
    ServeConfig,
    StreamText,
    TokenizeRequest,
    Unavailable,
)

PAGE = Path(__file__).resolve().parents[1] / "assets" / "serve.html"


POLL_S = 0.25  # how often a waiting request checks its client and the worker


ERROR_TYPES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
               422: "invalid_request", 429: "busy", 499: "cancelled", 500: "internal_error", 503: "unavailable",
               504: "timeout"}


FAILURES = {"error": 500, "unavailable": 503, "timeout": 504, "cancelled": 499}  # worker event -> status


def one_line(text: str, limit: int = 1000) -> str:
    """``text`` on one printable line (control characters and lone surrogates escaped), at most ``limit``
    characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The documented error body, ``{"error": {"type", "message"}}``."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"type": ERROR_TYPES.get(status, "error"), "message": one_line(message)}})


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, from its Content-Length before
    reading it, or while reading a body without one."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        """Pass the request on, answering 413 when its body exceeds the limit (declared or as read)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body exceeds this server's limit of {self.limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > self.limit):
            await error_response(413, message)(scope, receive, send)
            return
        received = 0

        async def limited():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, message)
            return event

        await self.app(scope, limited, send)


def _field_errors(exc: RequestValidationError) -> str:
    """One line for a request's validation errors."""
    problems = []
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            problems.append(f"body: invalid JSON at character {loc[0] if loc else '?'} "
                            f"({err.get('ctx', {}).get('error', 'decode error')})")
        elif not loc and err.get("type") in ("missing", "model_attributes_type", "model_type", "dict_type"):
            problems.append("body: the request must be a JSON object")
        elif not loc:
            problems.append(f"body: {err.get('msg')}")
        elif err.get("type") == "extra_forbidden":
            problems.append(f"unknown field {loc[-1][:40]!r}")
        else:
            problems.append(f"{'.'.join(loc)}: {err.get('msg')}")
    return "; ".join(problems)


class Stalled(Exception):
    """A streaming client stopped reading."""


def _only(exc: BaseException, kind: type) -> bool:
    """Whether ``exc`` is a ``kind``, or a group of them (task groups wrap what their tasks raise)."""
    if isinstance(exc, kind):
        return True
    inner = getattr(exc, "exceptions", None)
    return bool(inner) and all(_only(e, kind) for e in inner)


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that drops a client which stops reading once ``deadline``
    (``time.monotonic()``) has passed, and calls ``on_close`` however it ends."""

    def __init__(self, events, deadline: float, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.deadline, self.on_close = deadline, on_close

    async def __call__(self, scope, receive, send):
        """Send the stream, ending it quietly when the client stops reading past the deadline; ``on_close`` runs at
        the end."""
        async def bounded(message):
            try:
                await asyncio.wait_for(send(message), max(1.0, self.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise Stalled from None

        try:
            await super().__call__(scope, receive, bounded)
        except Exception as exc:
            if not _only(exc, Stalled):
                raise
        finally:
            self.on_close()


def create_app(service: ModelService):
    """The FastAPI application around ``service``."""
    app = FastAPI(title="unmask", version=__version__)
    app.add_middleware(BodyLimit, limit=service.config.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(422, _field_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return error_response(500, f"internal error ({type(exc).__name__})")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        """A web page that sends a prompt and shows the canvas unmask step by step."""
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        """``ok`` with the pending requests and counters, or 503 naming the problem."""
        problem = service.check_worker()
        if problem:
            return error_response(503, problem)
        prefixes = service.prefixes
        reuse = {} if prefixes is None else {"prefix_tokens_reused": prefixes.reused,
                                             "prefix_tokens_computed": prefixes.computed}
        return {"status": "ok", "pending": service.pending, **service.stats, **reuse}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type=service.metrics.content_type)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """The tokenizer's special tokens, maximum length and chat template (vLLM's endpoint, read by lm-eval's
        remote tokenizer)."""
        return service.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        """Token ids of a text (vLLM's format)."""
        try:
            tokens = await asyncio.to_thread(service.tokenize, req.prompt, req.add_special_tokens)
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": service.length}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        """The text of token ids (vLLM's format)."""
        try:
            return {"prompt": service.detokenize(req.tokens)}
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/v1/models")
    async def models():
        """The one model served: its name, family, lengths, tokenizer, samplers and limits (OpenAI's list format)."""
        return {"object": "list", "data": [service.metadata()]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        """Completions of ``prompt`` (OpenAI's format; streamed with ``stream``)."""
        return await respond(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        """The answer to ``messages`` in the model's chat template (OpenAI's format)."""
        if req.prompt:
            raise HTTPException(400, "a chat request takes messages, not prompt")
        return await respond(req, request)

    async def respond(req: CompletionRequest, request: Request):
        chat = isinstance(req, ChatCompletionRequest)
        deadline = time.monotonic() + service.config.timeout_s
        try:
            job, seed = await service.submit(req)
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from None
        except Busy as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        except Unavailable as exc:
            raise HTTPException(503, str(exc)) from None
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": service.name}

        def choice(i: int, row, nfe: int) -> dict:
            if chat:
                text, reason = service.answer(job.canvas[i], row)
                return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                        "nfe": nfe}
            return {"index": i, "text": service.completion_text(job.canvas[i], row), "tokens": service.pieces(row),
                    "finish_reason": "length", "nfe": nfe}

        def final(payload) -> dict:
            tokens = payload["tokens"]
            choices = [choice(i, tokens[i], int(payload["row_nfe"][i])) for i in range(len(tokens))]
            generated = int((job.canvas == service.tokenizer.mask_id).sum())
            prompt = int((job.canvas != service.tokenizer.mask_id).sum())
            return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                    "usage": {"prompt_tokens": prompt, "completion_tokens": generated,
                              "total_tokens": prompt + generated},
                    "unmask": {"seed": seed, "sampler": job.sample_cfg.sampler, "steps": job.sample_cfg.steps,
                               "seconds": payload["seconds"], "batched_with": payload["batch_requests"] - 1}}

        async def next_event(watch_client: bool):
            """The job's next event; meanwhile the deadline, the worker and (``watch_client``) the client."""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    job.cancelled = True
                    return "timeout", f"the request did not finish within {service.config.timeout_s:g} s"
                try:
                    return await asyncio.wait_for(job.events.get(), timeout=min(POLL_S, left))
                except asyncio.TimeoutError:
                    service.check_worker()
                    if watch_client and await request.is_disconnected():
                        job.cancelled = True
                        return "cancelled", "the client disconnected"

        if not req.stream:
            try:
                kind, payload = await next_event(watch_client=True)
            finally:
                job.cancelled = True  # a no-op once done; stops the work when this handler is cancelled
            if kind != "done":
                raise HTTPException(FAILURES[kind], payload)
            if job.work is None:
                return final(payload)
            choices = service.likelihood_choices(job, payload["scores"])
            prompt = sum(len(ids) for ids in job.prompts)
            completion = sum(len(c["logprobs"]["tokens"]) for c in choices) - prompt
            bound = bool(choices) and choices[0]["unmask"]["bound"]
            return {**head, "object": "text_completion", "choices": choices,
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion},
                    "unmask": {"seed": seed, "likelihood": "bound" if bound else "exact",
                               "mc_samples": job.mc_samples if bound else None, "seconds": payload["seconds"]}}

        stream = StreamText(service, job.canvas, chat, job.sampler.revises)
        chunk_object = "chat.completion.chunk" if chat else "text_completion"

        def chunk(step: int, texts: list[str], extensions: list[dict], reasons: list | None = None) -> dict:
            """An OpenAI chunk of every choice (a text delta; for chat, a message delta) with unmask's extension."""
            choices = []
            for i, (text, extra) in enumerate(zip(texts, extensions)):
                choice = {"index": i, "finish_reason": None if reasons is None else reasons[i], "unmask": extra}
                if chat:
                    choice["delta"] = {"content": text, **({"role": "assistant"} if step == 0 else {})}
                else:
                    choice["text"] = text
                choices.append(choice)
            return {**head, "object": chunk_object, "step": step, "choices": choices}

        async def events():
            yield sse(chunk(0, [""] * len(job.canvas), [{"canvas": service.pieces(row)} for row in job.canvas]))
            while True:
                kind, payload = await next_event(watch_client=False)  # the response watches the client
                if kind == "step":
                    job.taken += 1
                    step, rows = payload
                    yield sse(chunk(step, stream.step(rows), stream.positions(rows)))
                elif kind == "done":
                    whole = final(payload)
                    texts = [c["message"]["content"] if chat else c["text"] for c in whole["choices"]]
                    moves = stream.positions(payload["tokens"])
                    extras = [{**move, "tokens": service.pieces(row), "text": text, "nfe": c["nfe"]}
                              for move, row, text, c in zip(moves, payload["tokens"], texts, whole["choices"])]
                    last = chunk(payload["steps"], [stream.delta(i, t) for i, t in enumerate(texts)], extras,
                                 [c["finish_reason"] for c in whole["choices"]])
                    yield sse({**last, "usage": whole["usage"], "unmask": {**whole["unmask"], "final": True}})
                    break
                else:
                    yield sse({"error": {"type": ERROR_TYPES[FAILURES[kind]], "message": one_line(payload)}})
                    break
            yield "data: [DONE]\n\n"

        def closed() -> None:
            job.cancelled = True  # a client that goes away stops the work (once no one else shares it)

        return EventStream(events(), deadline, closed)

    return app


def sse(payload: dict) -> str:
    """One server-sent event: ``data: <payload as JSON>`` and a blank line."""
    return f"data: {json.dumps(payload)}\n\n"


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          config: ServeConfig | None = None, model_precision: str = "fp32", tokenizer: str | None = None,
          name: str | None = None, quantize: str = "none") -> None:
    """Load ``model`` (any source of :func:`unmask.checkpoints.pretrained.open_source`, its weights ``quantize``d)
    and serve it as ``name`` (default: its folder's name) until interrupted (SIGINT or SIGTERM): HTTP from a
    thread, decoding in this (the main) thread (see :meth:`ModelService.serve_forever`)."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = from_pretrained(model, device=dev, tokenizer_path=tokenizer, quantize=quantize)
    service = ModelService(loaded, config, dev, model_precision, name, worker=False)
    server, thread, port = start_server(service, host, port)
    print(f"serving {service.name} ({service.family.name}, {service.metadata()['parameters']:,} parameters) on "
          f"http://{host}:{port} ({dev})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop as on Ctrl-C: every request gets its answer
    try:
        service.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        service.close()
        server.should_exit = True
        thread.join(timeout=10)


def start_server(service: ModelService, host: str, port: int) -> tuple[uvicorn.Server, threading.Thread, int]:
    """Start serving ``service`` on ``host:port`` (0: a free port) from a background thread, once it listens;
    returns the server, its thread and the port. ConfigError if it cannot listen there (the port is taken, the
    address is not this machine's)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: without, Nagle's algorithm and delayed ACKs added 44 ms to each answer
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        service.close()
        raise ConfigError(f"could not listen on {host}:{port}: {exc.strerror or exc}") from None
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            service.close()
            raise ConfigError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


@contextlib.contextmanager
def running_server(service: ModelService, host: str = "127.0.0.1", port: int = 0):
    """Serve ``service`` from a background thread; yields the base URL (tests, benchmarks)."""
    server, thread, port = start_server(service, host, port)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
