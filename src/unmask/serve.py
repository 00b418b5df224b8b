"""HTTP serving: an OpenAI-style completions API with server-sent-event streaming of the canvas, request
batching, and a web page that shows text being unmasked.

    unmask serve MODEL [--host 127.0.0.1] [--port 8000]

Endpoints (FastAPI on uvicorn):

* ``GET /`` the page (``assets/serve.html``, no build step);
* ``GET /health``; ``GET /v1/models`` model metadata;
* ``POST /v1/completions``: ``prompt`` (text; ``[MASK]`` / ``[MASK*n]`` markers make it an infilling
  request whose markers are what is generated, otherwise ``max_tokens`` tokens follow the prompt),
  ``max_tokens`` (default: up to the model's length), ``temperature``, ``top_p``, ``top_k``, ``sampler``,
  ``steps``, ``tokens_per_step``,
  ``guidance`` (unsupervised classifier-free guidance weight), ``seed``, ``n``, ``stream``. With
  ``stream: true`` the answer is ``text/event-stream``: one event per sampling step with the canvas of
  every choice (``tokens``: one string per position, ``null`` where still masked), a final event with
  the texts, then ``[DONE]``.

Every request is validated (unknown fields, types, ranges, lengths: 4xx with a message). Work goes to
one worker thread, which runs the sampler; requests that arrive within ``batch_window_ms`` of each
other and share a shape (sampler settings and canvas length) run as one batch. Samplers give every
row its own random stream, so a request's result does not depend on what it was batched with: the
same seed gives the same text alone or batched, streamed or not. ``max_pending`` bounds the queued
and running requests (429 beyond it) and ``timeout_s`` each request (504).
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
from pydantic import BaseModel, ConfigDict, Field

from .config import ConfigError, SampleConfig
from .runtime import autocast, resolve_precision
from .sampling import (MASK_MARK, SamplingError, encode_fixed, encode_template, make_canvas, make_sampler,
                       row_seeds)

PAGE = Path(__file__).parent / "assets" / "serve.html"
SAMPLERS = ("ancestral", "first_hitting", "confidence", "ar")


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


class CompletionRequest(BaseModel):
    """``POST /v1/completions``; unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str = ""
    max_tokens: int | None = Field(None, ge=1)  # None: up to the model's length
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    sampler: Literal["ancestral", "first_hitting", "confidence", "ar"] | None = None
    steps: int | None = Field(None, ge=1)
    tokens_per_step: int = Field(1, ge=1)
    guidance: float = Field(0.0, ge=-1.0, le=100.0)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    n: int = Field(1, ge=1)
    stream: bool = False


class RequestError(ValueError):
    """A request that is well-formed JSON but cannot be served (too long, too many steps...)."""


class Busy(RuntimeError):
    """Too much work queued."""


@dataclasses.dataclass
class Job:
    """One request's rows on their way through the worker."""

    canvas: torch.Tensor  # (n, L)
    seeds: torch.Tensor  # (n,)
    key: tuple  # requests with equal keys can share a batch
    sample_cfg: SampleConfig
    events: "asyncio.Queue"
    loop: asyncio.AbstractEventLoop
    stream: bool
    cancelled: bool = False

    def emit(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the server's event loop is gone (shutting down): nobody is waiting
            self.cancelled = True


class Cancelled(Exception):
    pass


class ModelService:
    """A loaded model, the request -> canvas logic, and the batching worker thread."""

    def __init__(self, loaded, config: ServeConfig | None = None, device: torch.device | str = "cpu",
                 model_precision: str = "fp32", name: str | None = None):
        self.loaded, self.config = loaded, config or ServeConfig()
        self.device = torch.device(device)
        self.name = name or str(loaded.source.path)
        self.model, self.tokenizer, self.run = loaded.model, loaded.tokenizer, loaded.config
        self.family = self.run.family
        if self.family not in ("mdlm", "ar"):
            raise ConfigError(f"unmask serve runs masked diffusion (mdlm) and ar models, not {self.family}; "
                              f"use unmask sample for it")
        self.length = self.run.model.length
        self.bos = self.run.data.layout == "pad" or self.run.data.frame
        self.precision = resolve_precision(model_precision, self.device)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.pending = 0
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "largest_batch": 0}
        self.worker = threading.Thread(target=self._work, name="unmask-sampler", daemon=True)
        self.stopping = False
        self.worker.start()

    # --- requests -----------------------------------------------------------------------------
    def metadata(self) -> dict:
        cfg = self.run
        return {"id": self.name, "object": "model", "family": self.family, "max_length": self.length,
                "vocab_size": self.tokenizer.vocab_size, "tokenizer": self.tokenizer.describe().get("kind"),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "step": self.loaded.source.step, "soft_mask": bool(cfg.model.soft_mask_top_k),
                "samplers": ["ar"] if self.family == "ar" else [s for s in SAMPLERS if s != "ar"],
                "default_sampler": "ar" if self.family == "ar" else "first_hitting",
                "limits": dataclasses.asdict(self.config), "device": str(self.device)}

    def prepare(self, req: CompletionRequest) -> tuple[torch.Tensor, torch.Tensor, SampleConfig, int]:
        """(canvas (n, L), seeds (n,), sampler config, seed) for a request, or RequestError."""
        c = self.config
        if req.n > c.max_n:
            raise RequestError(f"n={req.n} exceeds this server's limit of {c.max_n}")
        if req.model not in (None, "", self.name):
            raise RequestError(f"model '{req.model}' is not served here (this server serves '{self.name}')")
        sampler = req.sampler or ("ar" if self.family == "ar" else "first_hitting")
        if (sampler == "ar") != (self.family == "ar"):
            raise RequestError(f"sampler '{sampler}' does not apply to this {self.family} model")
        infill = bool(MASK_MARK.search(req.prompt))
        if infill and self.family == "ar":
            raise RequestError("infilling ([MASK] markers) needs a masked diffusion model")
        try:
            if infill:
                ids = encode_template(self.tokenizer, req.prompt)
            else:
                ids = encode_fixed(self.tokenizer, req.prompt)
                room = self.length - len(ids) - int(self.bos)
                if req.max_tokens is None and room < 1:
                    raise RequestError(f"a prompt of {len(ids)} tokens leaves no room in this model's "
                                       f"maximum of {self.length}")
                ids += [self.tokenizer.mask_id] * (req.max_tokens or room)
        except (SamplingError, ValueError) as exc:
            raise RequestError(f"prompt: {exc}") from None
        length = len(ids) + int(self.bos)
        if length > self.length:
            raise RequestError(f"prompt and completion take {length} tokens; this model's maximum is {self.length}")
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
        if req.tokens_per_step > length:
            raise RequestError(f"tokens_per_step={req.tokens_per_step} is larger than the canvas of {length}")
        return canvas, row_seeds(seed, req.n), cfg, seed

    def submit(self, req: CompletionRequest, loop: asyncio.AbstractEventLoop) -> tuple[Job, int]:
        canvas, seeds, cfg, seed = self.prepare(req)
        with self.lock:
            if self.pending >= self.config.max_pending:
                raise Busy(f"{self.pending} requests are queued or running (limit {self.config.max_pending}); "
                           f"retry later")
            self.pending += 1
            self.stats["requests"] += 1
        key = (dataclasses.astuple(dataclasses.replace(cfg, seed=0)), canvas.shape[1])
        job = Job(canvas, seeds, key, cfg, asyncio.Queue(), loop, req.stream)
        self.jobs.put(job)
        return job, seed

    # --- the worker -----------------------------------------------------------------------------
    def _work(self) -> None:
        """Take the oldest request, gather the requests of the same shape that arrive within the batch
        window (up to ``max_batch_rows`` rows), run them as one batch. Requests of other shapes met on
        the way keep their order and go first in the next round."""
        torch.set_grad_enabled(False)
        backlog: collections.deque[Job] = collections.deque()
        while not self.stopping:
            if backlog:
                first = backlog.popleft()
            else:
                try:
                    first = self.jobs.get(timeout=0.2)
                except queue.Empty:
                    continue
            batch, rows = [first], len(first.canvas)
            if self.config.batching:
                for job in list(backlog):
                    if job.key == first.key and rows + len(job.canvas) <= self.config.max_batch_rows:
                        backlog.remove(job)
                        batch.append(job)
                        rows += len(job.canvas)
                deadline = time.monotonic() + self.config.batch_window_ms / 1000
                while rows < self.config.max_batch_rows:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        job = self.jobs.get(timeout=left)
                    except queue.Empty:
                        break
                    if job.key == first.key and rows + len(job.canvas) <= self.config.max_batch_rows:
                        batch.append(job)
                        rows += len(job.canvas)
                    else:
                        backlog.append(job)
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        self._release([job for job in batch if job.cancelled])
        batch = [job for job in batch if not job.cancelled]
        if not batch:
            return
        canvas = torch.cat([job.canvas for job in batch]).to(self.device)
        seeds = torch.cat([job.seeds for job in batch]).to(self.device)
        bounds = [0]
        for job in batch:
            bounds.append(bounds[-1] + len(job.canvas))
        streaming = [i for i, job in enumerate(batch) if job.stream]

        def on_step(x: torch.Tensor) -> None:
            if all(job.cancelled for job in batch):
                raise Cancelled
            if streaming:
                x = x.cpu()
                for i in streaming:
                    batch[i].emit("step", x[bounds[i]:bounds[i + 1]].clone())

        try:
            sampler = make_sampler(batch[0].sample_cfg, self.loaded.objective, self.tokenizer, self.length)
            with autocast(self.device, self.precision):
                result = sampler.sample(self.model, canvas, seeds, on_step)
        except Cancelled:
            self._release(batch)
            return
        except Exception as exc:  # report to every request of the batch, keep serving
            for job in batch:
                job.emit("error", f"{type(exc).__name__}: {exc}")
            self._release(batch)
            return
        with self.lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(canvas)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        tokens, row_nfe = result.tokens.cpu(), result.row_nfe.cpu()
        for i, job in enumerate(batch):
            job.emit("done", {"tokens": tokens[bounds[i]:bounds[i + 1]], "row_nfe": row_nfe[bounds[i]:bounds[i + 1]],
                              "seconds": result.seconds, "batch_requests": len(batch)})
        self._release(batch)

    def _release(self, jobs: list[Job]) -> None:
        with self.lock:
            self.pending -= len(jobs)

    def close(self) -> None:
        self.stopping = True
        self.worker.join(timeout=5)

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


def create_app(service: ModelService):
    """The FastAPI application around ``service``."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="unmask", version="0.1.0")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg')}")
        return JSONResponse(status_code=422,
                            content={"error": {"type": "invalid_request", "message": "; ".join(problems)}})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = {400: "invalid_request", 404: "not_found", 429: "busy", 504: "timeout"}.get(exc.status_code, "error")
        return JSONResponse(status_code=exc.status_code, content={"error": {"type": kind, "message": str(exc.detail)}})

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending": service.pending, **service.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.metadata()]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        loop = asyncio.get_running_loop()
        try:
            job, seed = service.submit(req, loop)
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from None
        except Busy as exc:
            raise HTTPException(429, str(exc)) from None
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

        async def next_event():
            try:
                return await asyncio.wait_for(job.events.get(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.cancelled = True
                return "timeout", f"the request did not finish within {service.config.timeout_s:g} s"

        deadline = time.monotonic() + service.config.timeout_s
        if not req.stream:
            while True:
                kind, payload = await next_event()
                if kind == "done":
                    return final(payload)
                if kind == "timeout":
                    raise HTTPException(504, payload)
                if kind == "error":
                    raise HTTPException(500, payload)

        async def events():
            step = 0
            try:
                yield sse({**head, "object": "text_completion.chunk", "step": 0,
                           "choices": [{"index": i, "tokens": service.pieces(job.canvas[i])}
                                       for i in range(len(job.canvas))]})
                while True:
                    kind, payload = await next_event()
                    if kind == "step":
                        step += 1
                        yield sse({**head, "object": "text_completion.chunk", "step": step,
                                   "choices": [{"index": i, "tokens": service.pieces(row)}
                                               for i, row in enumerate(payload)]})
                    elif kind == "done":
                        yield sse({**final(payload), "object": "text_completion.final", "step": step})
                        break
                    else:
                        yield sse({"error": {"type": kind, "message": payload}})
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # a client that goes away stops the work (once no one else shares it)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          config: ServeConfig | None = None, model_precision: str = "fp32", tokenizer: str | None = None) -> None:
    """Load ``model`` (any source of :func:`unmask.pretrained.open_source`) and serve it until interrupted."""
    import uvicorn

    from .pretrained import from_pretrained

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    service = ModelService(from_pretrained(model, device=dev, tokenizer_path=tokenizer), config, dev, model_precision)
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
