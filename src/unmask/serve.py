"""HTTP serving: an OpenAI-style completions API with server-sent-event streaming of the canvas, request
batching, and a web page that shows text being unmasked.

    unmask serve MODEL [--host 127.0.0.1] [--port 8000]

Endpoints (FastAPI on uvicorn):

* ``GET /`` the page (``assets/serve.html``, no build step);
* ``GET /health``: 200 with the queue and counters while the sampling worker runs, 503 when it had
  stopped (see below) or the server is shutting down;
* ``GET /v1/models`` model metadata; the model's id is the name of its folder (the run folder for a
  checkpoint, ``org/name`` for a hub download), never a local path;
* ``POST /v1/completions``: ``prompt`` (text; ``[MASK]`` / ``[MASK*n]`` markers make it an infilling
  request whose markers are what is generated, otherwise ``max_tokens`` tokens follow the prompt),
  ``max_tokens`` (default: up to the length the model was trained on, ``data.length``; at most the
  model's length), ``temperature``, ``top_p``, ``top_k``, ``sampler``, ``steps``, ``tokens_per_step``,
  ``guidance`` (unsupervised classifier-free guidance weight), ``seed``, ``n``, ``stream``. With
  ``stream: true`` the answer is ``text/event-stream``: one event per sampling step with the canvas of
  every choice (``tokens``: one string per position, ``null`` where still masked), a final event with
  the texts, then ``[DONE]``.

Requests are validated before any work. JSON types are strict (``"stream": "yes"`` or ``"n": "2"`` is an
error, not a coercion), numbers finite, unknown fields an error. ``max_tokens``, ``[MASK*n]`` counts,
``n``, ``steps`` and ``tokens_per_step`` are checked against the model and the limits of
:class:`ServeConfig` before a canvas is built, and a body over ``max_body_bytes`` gets 413 without being
read. Tokenizing and building the canvas run off the event loop, so ``/health`` answers meanwhile.

Every error response (400, 404, 405, 413, 422, 429, 500, 503, 504) is ``{"error": {"type", "message"}}``
with a one-line message; a stream that fails once started ends with such an object before ``[DONE]``.

Work goes to one worker thread, which runs the sampler; requests that arrive within ``batch_window_ms``
of each other and share a shape (sampler settings and canvas length) run as one batch. Samplers give
every row its own random stream, so a request's result does not depend on what it was batched with:
the same seed gives the same text alone or batched, streamed or not. ``max_pending`` bounds the queued
and running requests (429 beyond it) and ``timeout_s`` each request (504). A request whose client
disconnects or times out is cancelled: its rows stop once nothing else in their batch needs the work.
A streaming client more than ``max_stream_lag`` events behind misses intermediate canvases (the final
event still carries the result), and one that stops reading is dropped at its deadline, so no request
holds memory past ``timeout_s``.

Health: an error while running a batch fails that batch's requests (500) and the worker carries on.
Should the worker thread die anyway, whoever notices first (``/health``, a new request, or a request
waiting for its result) restarts it: the requests it was running get 503, queued ones are kept, and a
``/health`` that finds it dead answers 503 with the reason; ``restarts`` in ``/health`` counts them.
:meth:`ModelService.close` (shutdown) answers every queued or running request with 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ConfigError, SampleConfig
from .runtime import autocast, resolve_precision
from .sampling import (MASK_MARK, SamplingError, encode_fixed, encode_template, make_canvas, make_sampler,
                       row_seeds)

PAGE = Path(__file__).parent / "assets" / "serve.html"
SAMPLERS = ("ancestral", "first_hitting", "confidence", "ar")
POLL_S = 0.25  # how often a waiting request checks its client and the worker
ERROR_TYPES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
               422: "invalid_request", 429: "busy", 499: "cancelled", 500: "internal_error", 503: "unavailable",
               504: "timeout"}
FAILURES = {"error": 500, "unavailable": 503, "timeout": 504, "cancelled": 499}  # worker event -> status


@dataclasses.dataclass
class ServeConfig:
    """Limits and batching of a server."""

    max_batch_rows: int = 32
    batch_window_ms: float = 5.0
    batching: bool = True
    max_pending: int = 64
    timeout_s: float = 120.0
    max_n: int = 8
    max_steps: int = 4096
    max_body_bytes: int = 1 << 20
    max_stream_lag: int = 64


class CompletionRequest(BaseModel):
    """``POST /v1/completions``; unknown fields are an error, and so is a value of the wrong JSON type."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str = ""
    max_tokens: int | None = Field(None, ge=1)  # None: up to the length the model was trained on
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    sampler: Literal["ancestral", "first_hitting", "confidence", "ar"] | None = None
    steps: int | None = Field(None, ge=1)
    tokens_per_step: int = Field(1, ge=1)
    guidance: float = Field(0.0, ge=-1.0, le=100.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    n: int = Field(1, ge=1)
    stream: bool = False


class RequestError(ValueError):
    """A request that is well-formed JSON but cannot be served (too long, too many steps...)."""


class Busy(RuntimeError):
    """Too much work queued."""


class Unavailable(RuntimeError):
    """The server is shutting down."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's rows on their way through the worker (compared by identity)."""

    canvas: torch.Tensor  # (n, L)
    seeds: torch.Tensor  # (n,)
    key: tuple  # requests with equal keys can share a batch
    sample_cfg: SampleConfig
    events: "asyncio.Queue"
    loop: asyncio.AbstractEventLoop
    stream: bool
    cancelled: bool = False
    finished: bool = False
    queued: int = 0  # step events sent (written by the worker only)
    taken: int = 0  # step events read (written by the event loop only)

    def emit(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the server's event loop is gone (shutting down): nobody is waiting
            self.cancelled = True


class Cancelled(Exception):
    pass


def model_name(path: Path) -> str:
    """A name for the model at ``path`` that does not reveal where it lies on this machine."""
    path = Path(path)
    for part in path.parts:
        if part.startswith("models--"):  # a Hugging Face hub cache folder
            return part[len("models--"):].replace("--", "/")
    if path.parent.name == "checkpoints":  # run/checkpoints/step_N
        return path.parent.parent.name
    return path.name


class ModelService:
    """A loaded model, the request -> canvas logic, and the batching worker thread."""

    def __init__(self, loaded, config: ServeConfig | None = None, device: torch.device | str = "cpu",
                 model_precision: str = "fp32", name: str | None = None):
        self.loaded, self.config = loaded, config or ServeConfig()
        self.device = torch.device(device)
        self.name = name or model_name(loaded.source.path)
        self.model, self.tokenizer, self.run = loaded.model, loaded.tokenizer, loaded.config
        self.family = self.run.family
        if self.family not in ("mdlm", "ar"):
            raise ConfigError(f"unmask serve runs masked diffusion (mdlm) and ar models, not {self.family}; "
                              f"use unmask sample for it")
        self.length = self.run.model.length
        self.default_length = min(self.run.data.length, self.length)
        self.bos = self.run.data.layout == "pad" or self.run.data.frame
        self.precision = resolve_precision(model_precision, self.device)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.backlog: collections.deque[Job] = collections.deque()  # taken from the queue, not yet run
        self.current: list[Job] = []  # the batch the worker is gathering or running
        self.pending = 0
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "largest_batch": 0, "restarts": 0}
        self.stopping = False
        self.died = ""
        self.worker = self._start_worker()

    # --- requests -----------------------------------------------------------------------------
    def metadata(self) -> dict:
        cfg = self.run
        return {"id": self.name, "object": "model", "family": self.family, "max_length": self.length,
                "default_length": self.default_length,
                "vocab_size": self.tokenizer.vocab_size, "tokenizer": self.tokenizer.describe().get("kind"),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "step": self.loaded.source.step, "soft_mask": bool(cfg.model.soft_mask_top_k),
                "samplers": ["ar"] if self.family == "ar" else [s for s in SAMPLERS if s != "ar"],
                "default_sampler": "ar" if self.family == "ar" else "first_hitting",
                "limits": dataclasses.asdict(self.config), "device": str(self.device)}

    def prepare(self, req: CompletionRequest) -> tuple[torch.Tensor, torch.Tensor, SampleConfig, int]:
        """(canvas (n, L), seeds (n,), sampler config, seed) for a request, or RequestError. Sizes are
        checked before anything of that size is built."""
        c = self.config
        if req.n > c.max_n:
            raise RequestError(f"n={req.n} exceeds this server's limit of {c.max_n}")
        if req.steps is not None and req.steps > c.max_steps:
            raise RequestError(f"steps={req.steps} exceeds this server's limit of {c.max_steps}")
        if req.model not in (None, "", self.name):
            raise RequestError(f"model '{req.model}' is not served here (this server serves '{self.name}')")
        sampler = req.sampler or ("ar" if self.family == "ar" else "first_hitting")
        if (sampler == "ar") != (self.family == "ar"):
            raise RequestError(f"sampler '{sampler}' does not apply to this {self.family} model")
        room = self.length - int(self.bos)
        if req.max_tokens is not None and req.max_tokens > room:
            raise RequestError(f"max_tokens={req.max_tokens} does not fit: this model's maximum is {self.length} "
                               f"tokens" + (" with BOS" if self.bos else ""))
        infill = bool(MASK_MARK.search(req.prompt))
        if infill and self.family == "ar":
            raise RequestError("infilling ([MASK] markers) needs a masked diffusion model")
        try:
            ids = encode_template(self.tokenizer, req.prompt, room) if infill else \
                self._continuation(encode_fixed(self.tokenizer, req.prompt), req.max_tokens)
        except (SamplingError, ValueError) as exc:
            raise RequestError(f"prompt: {exc}") from None
        length = len(ids) + int(self.bos)
        if req.tokens_per_step > length:
            raise RequestError(f"tokens_per_step={req.tokens_per_step} is larger than the canvas of {length}")
        steps = req.steps or max(1, ids.count(self.tokenizer.mask_id))
        if steps > c.max_steps:
            raise RequestError(f"steps={steps} exceeds this server's limit of {c.max_steps}")
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little")
        cfg = SampleConfig(sampler=sampler, steps=steps, temperature=req.temperature, top_p=req.top_p,
                           top_k=req.top_k, tokens_per_step=req.tokens_per_step, guidance=req.guidance, seed=seed)
        try:
            make_sampler(cfg, self.loaded.objective, self.tokenizer, self.length)
            canvas = make_canvas(self.tokenizer, [ids] * req.n, length, self.bos)
        except SamplingError as exc:
            raise RequestError(str(exc)) from None
        return canvas, row_seeds(seed, req.n), cfg, seed

    def _continuation(self, ids: list[int], max_tokens: int | None) -> list[int]:
        """A prompt's ids followed by the masks to generate (``max_tokens``, or up to the default length)."""
        used = len(ids) + int(self.bos)
        if max_tokens is None:
            if used >= self.length:
                raise RequestError(f"a prompt of {len(ids)} tokens leaves no room in this model's maximum of "
                                   f"{self.length}")
            if used >= self.default_length:
                raise RequestError(f"a prompt of {len(ids)} tokens leaves no room in the {self.default_length} "
                                   f"tokens this model was trained on; set max_tokens (at most "
                                   f"{self.length - used})")
            max_tokens = self.default_length - used
        if used + max_tokens > self.length:
            raise RequestError(f"prompt and completion take {used + max_tokens} tokens; this model's maximum "
                               f"is {self.length}")
        return ids + [self.tokenizer.mask_id] * max_tokens

    async def submit(self, req: CompletionRequest) -> tuple[Job, int]:
        """Queue a request: a slot first (Busy, Unavailable), then its canvas, built off the event loop."""
        self.check_worker()
        with self.lock:
            if self.stopping:
                raise Unavailable("the server is shutting down")
            if self.pending >= self.config.max_pending:
                raise Busy(f"{self.pending} requests are queued or running (limit {self.config.max_pending}); "
                           f"retry later")
            self.pending += 1
        try:
            canvas, seeds, cfg, seed = await asyncio.to_thread(self.prepare, req)
        except BaseException:
            with self.lock:
                self.pending -= 1
            raise
        key = (dataclasses.astuple(dataclasses.replace(cfg, seed=0)), canvas.shape[1])
        job = Job(canvas, seeds, key, cfg, asyncio.Queue(), asyncio.get_running_loop(), req.stream)
        with self.lock:  # close() drains the queue after it sets stopping: nothing may arrive later
            if self.stopping:
                self.pending -= 1
                raise Unavailable("the server is shutting down")
            self.stats["requests"] += 1
            self.jobs.put(job)
        return job, seed

    # --- the worker -----------------------------------------------------------------------------
    def _start_worker(self) -> threading.Thread:
        worker = threading.Thread(target=self._work, name="unmask-sampler", daemon=True)
        worker.start()
        return worker

    def check_worker(self) -> str | None:
        """None while the worker runs; otherwise what happened, after restarting it (unless closing):
        the requests it was running get 503, queued ones wait for the new worker."""
        with self.lock:
            if self.stopping:
                return "the server is shutting down"
            if self.worker.is_alive():
                return None
            lost, self.current = self.current, []
            reason, self.died = self.died or "no reason given", ""
            self.stats["restarts"] += 1
            self.worker = self._start_worker()
        for job in lost:
            self._finish(job, "unavailable", f"the sampling worker stopped ({reason}) and was restarted; retry")
        return f"the sampling worker had stopped ({reason}); it was restarted"

    def _work(self) -> None:
        """Gather a batch and run it, until closed; an error fails that batch's requests only."""
        torch.set_grad_enabled(False)
        try:
            while not self.stopping:
                batch: list[Job] = []
                self.current = batch
                try:
                    self._gather(batch)
                    if batch:
                        self._run(batch)
                except Exception as exc:
                    for job in batch:
                        self._finish(job, "error", f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # the thread ends here; check_worker reports it and starts another
            self.died = f"{type(exc).__name__}: {exc}"

    def _gather(self, batch: list[Job]) -> None:
        """Take the oldest request, and the requests of the same shape that arrive within the batch
        window (up to ``max_batch_rows`` rows), into ``batch``. Requests of other shapes met on the way
        keep their order and go first in the next round."""
        if self.backlog:
            first = self.backlog.popleft()
        else:
            try:
                first = self.jobs.get(timeout=0.2)
            except queue.Empty:
                return
        batch.append(first)
        if not self.config.batching:
            return
        rows, limit = len(first.canvas), self.config.max_batch_rows
        later: collections.deque[Job] = collections.deque()
        for job in self.backlog:
            if job.key == first.key and rows + len(job.canvas) <= limit:
                batch.append(job)
                rows += len(job.canvas)
            else:
                later.append(job)
        self.backlog = later
        deadline = time.monotonic() + self.config.batch_window_ms / 1000
        while rows < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                job = self.jobs.get(timeout=left)
            except queue.Empty:
                break
            if job.key == first.key and rows + len(job.canvas) <= limit:
                batch.append(job)
                rows += len(job.canvas)
            else:
                self.backlog.append(job)

    def _run(self, batch: list[Job]) -> None:
        for job in batch:
            if job.cancelled:
                self._finish(job, "cancelled", None)
        batch = [job for job in batch if not job.cancelled]
        if not batch:
            return
        canvas = torch.cat([job.canvas for job in batch]).to(self.device)
        seeds = torch.cat([job.seeds for job in batch]).to(self.device)
        bounds = [0]
        for job in batch:
            bounds.append(bounds[-1] + len(job.canvas))
        streaming = [i for i, job in enumerate(batch) if job.stream]
        steps = 0

        def on_step(x: torch.Tensor) -> None:
            nonlocal steps
            steps += 1
            if self.stopping or all(job.cancelled for job in batch):
                raise Cancelled
            keeping_up = [i for i in streaming if batch[i].queued - batch[i].taken < self.config.max_stream_lag]
            if keeping_up:
                x = x.cpu()
                for i in keeping_up:
                    batch[i].queued += 1
                    batch[i].emit("step", (steps, x[bounds[i]:bounds[i + 1]].clone()))

        try:
            sampler = make_sampler(batch[0].sample_cfg, self.loaded.objective, self.tokenizer, self.length)
            with autocast(self.device, self.precision):
                result = sampler.sample(self.model, canvas, seeds, on_step)
        except Cancelled:
            for job in batch:
                if self.stopping:
                    self._finish(job, "unavailable", "the server is shutting down")
                else:
                    self._finish(job, "cancelled", None)
            return
        with self.lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(canvas)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        tokens, row_nfe = result.tokens.cpu(), result.row_nfe.cpu()
        for i, job in enumerate(batch):
            self._finish(job, "done", {"tokens": tokens[bounds[i]:bounds[i + 1]], "steps": steps,
                                       "row_nfe": row_nfe[bounds[i]:bounds[i + 1]], "seconds": result.seconds,
                                       "batch_requests": len(batch)})

    def _finish(self, job: Job, kind: str, payload) -> None:
        """Send a job its last event and free its slot, once."""
        with self.lock:
            if job.finished:
                return
            job.finished = True
            self.pending -= 1
        job.emit(kind, payload)

    def close(self) -> None:
        """Stop the worker; every queued or running request is answered 503."""
        with self.lock:
            self.stopping = True
        self.worker.join(timeout=5)
        held = list(self.current) + list(self.backlog)
        while True:
            try:
                held.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for job in held:
            self._finish(job, "unavailable", "the server is shutting down")

    # --- rendering ------------------------------------------------------------------------------
    def pieces(self, row: torch.Tensor) -> list[str | None]:
        """One string per position (``None`` where masked; special tokens as empty strings)."""
        tok = self.tokenizer
        specials = tok.special_ids - {tok.mask_id}
        return [None if i == tok.mask_id else ("" if i in specials else tok.decode([i], skip_special=False))
                for i in row.tolist()]

    def completion_text(self, canvas: torch.Tensor, row: torch.Tensor) -> str:
        """The generated text: the continuation after a prompt, or the whole filled text for infilling."""
        generated = (canvas == self.tokenizer.mask_id).nonzero()[:, 0]
        if len(generated) and int(generated[-1]) - int(generated[0]) + 1 == len(generated) and \
                int(generated[-1]) == len(row) - 1:
            return self.tokenizer.decode(row[int(generated[0]):])
        return self.tokenizer.decode(row)


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
    app = FastAPI(title="unmask", version="0.1.0")
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
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        problem = service.check_worker()
        if problem:
            return error_response(503, problem)
        return {"status": "ok", "pending": service.pending, **service.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.metadata()]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        deadline = time.monotonic() + service.config.timeout_s
        try:
            job, seed = await service.submit(req)
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from None
        except Busy as exc:
            raise HTTPException(429, str(exc)) from None
        except Unavailable as exc:
            raise HTTPException(503, str(exc)) from None
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": service.name}

        def final(payload) -> dict:
            tokens = payload["tokens"]
            choices = [{"index": i, "text": service.completion_text(job.canvas[i], tokens[i]),
                        "tokens": service.pieces(tokens[i]), "finish_reason": "length",
                        "nfe": int(payload["row_nfe"][i])} for i in range(len(tokens))]
            generated = int((job.canvas == service.tokenizer.mask_id).sum())
            prompt = int((job.canvas != service.tokenizer.mask_id).sum())
            return {**head, "object": "text_completion", "choices": choices,
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
            if kind == "done":
                return final(payload)
            raise HTTPException(FAILURES[kind], payload)

        async def events():
            yield sse({**head, "object": "text_completion.chunk", "step": 0,
                       "choices": [{"index": i, "tokens": service.pieces(job.canvas[i])}
                                   for i in range(len(job.canvas))]})
            while True:
                kind, payload = await next_event(watch_client=False)  # the response watches the client
                if kind == "step":
                    job.taken += 1
                    step, rows = payload
                    yield sse({**head, "object": "text_completion.chunk", "step": step,
                               "choices": [{"index": i, "tokens": service.pieces(row)}
                                           for i, row in enumerate(rows)]})
                elif kind == "done":
                    yield sse({**final(payload), "object": "text_completion.final", "step": payload["steps"]})
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
    return f"data: {json.dumps(payload)}\n\n"


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          config: ServeConfig | None = None, model_precision: str = "fp32", tokenizer: str | None = None,
          name: str | None = None) -> None:
    """Load ``model`` (any source of :func:`unmask.pretrained.open_source`) and serve it as ``name``
    (default: its folder's name) until interrupted."""
    import uvicorn

    from .pretrained import from_pretrained

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    service = ModelService(from_pretrained(model, device=dev, tokenizer_path=tokenizer), config, dev, model_precision,
                           name)
    print(f"serving {service.name} ({service.family}, {service.metadata()['parameters']:,} parameters) on "
          f"http://{host}:{port} ({dev})", flush=True)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    finally:
        service.close()


@contextlib.contextmanager
def running_server(service: ModelService, host: str = "127.0.0.1", port: int = 0):
    """Serve ``service`` from a background thread; yields the base URL (tests, benchmarks)."""
    import socket

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
