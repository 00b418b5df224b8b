"""The model service behind the HTTP app: request schemas and preparation (generation and likelihood), limits,
the cache budget, the worker (step-level continuous batching, or request batching), and the rendering of
answers and streams."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..config import ConfigError, SampleConfig
from ..data.layouts import starts_with_bos
from ..eval.likelihood import TokenScores, token_loglikelihoods
from ..families import FAMILIES, family_of
from ..objectives.base import unwrap
from ..pipeline import MASK_MARK, chat_answer, chat_prompt, encode_fixed, make_canvas, request_ids
from ..runtime import autocast, resolve_precision
from ..samplers.base import SamplingError, row_seeds
from ..samplers.engine import DecodingEngine, Handle, Sampler, tensor_bytes
from ..samplers.prefix_cache import PrefixCache
from ..samplers.registry import SAMPLERS, make_sampler, samplers_for
from .metrics import ServeMetrics

SCHEDULING = ("step", "request", "serial")


@dataclasses.dataclass
class ServeConfig:
    """Limits and scheduling of a server.

    ``scheduling``: ``step`` (continuous batching: requests join and leave between denoising steps, every step
    one forward over all of them, see :class:`ModelService`), ``request`` (requests of one shape that arrive
    within ``batch_window_ms`` run together as one ``sample`` call, to the end) or ``serial`` (one request at a
    time)."""

    scheduling: str = "step"
    max_batch_rows: int = 32  # rows decoded together (per step, or per request batch)
    max_step_tokens: int = 8192  # step scheduling: canvas positions decoded together (rows x length)
    cache_budget_bytes: int = 1 << 30  # the caches of the requests queued and running (KV, block, encoder)
    prefix_cache_bytes: int = 1 << 28  # step scheduling: prompt prefixes' keys and values kept for reuse (0: off)
    max_likelihood_rows: int = 4096  # network rows one likelihood request may evaluate (prompt tokens x samples)
    mc_samples: int = 32  # Monte-Carlo draws of a diffusion model's likelihood bound (a request may set its own)
    batch_window_ms: float = 5.0
    max_pending: int = 64
    timeout_s: float = 120.0
    max_n: int = 8
    max_steps: int = 4096
    max_body_bytes: int = 1 << 20
    max_stream_lag: int = 64


class CompletionRequest(BaseModel):
    """``POST /v1/completions``; unknown fields are an error, and so is a value of the wrong JSON type."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="ignored: the server serves one model (OpenAI clients send it)")
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        "", description="the text the completion continues ([MASK] / [MASK*n] mark gaps to infill), or its token "
        "ids; a list of prompts (texts or token-id lists) for likelihood requests")
    max_tokens: int | None = Field(None, ge=0, description="tokens to generate; null: up to the model's trained "
                                   "length; 0 (with echo and logprobs): score the prompt only")
    echo: bool = Field(False, description="with logprobs: return the prompt's tokens and their log-probabilities")
    logprobs: int | None = Field(None, ge=0, le=20, description="with echo: also the most likely tokens at each "
                                 "position, this many")
    mc_samples: int | None = Field(None, ge=1, le=4096, description="likelihood requests of diffusion models: "
                                   "Monte-Carlo draws of the bound (null: the server's --mc-samples)")
    temperature: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False,
                                      description="sampling temperature; null: the model's sample.temperature")
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass")
    top_k: int | None = Field(None, ge=0, description="sample among the k most likely tokens (0: all)")
    sampler: Literal[tuple(SAMPLERS)] | None = Field(None, description="a sampler of the registry; null: the "
                                                     "family's default")
    steps: int | None = Field(None, ge=1, description="denoising steps (diffusion samplers)")
    tokens_per_step: int = Field(1, ge=1, description="tokens revealed per step where the sampler takes it")
    guidance: float = Field(0.0, ge=-1.0, le=100.0, allow_inf_nan=False,
                            description="unsupervised classifier-free guidance weight (0: off)")
    seed: int | None = Field(None, ge=0, lt=2 ** 63, description="seed of the request's rows (reproducible, "
                             "batch-invariant); null: drawn")
    n: int = Field(1, ge=1, description="completions to return")
    stream: bool = Field(False, description="answer as text/event-stream: one event per sampling step with the canvas")


class ChatMessage(BaseModel):
    """One message of a chat."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"] = Field(description="who speaks")
    content: str = Field(description="what is said")


class ChatCompletionRequest(CompletionRequest):
    """``POST /v1/chat/completions``: ``messages`` rendered by the model's chat template (which places
    BOS itself) instead of ``prompt``; the answer ends at the first special token the model generates."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's format)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="the text to tokenize")
    add_special_tokens: bool = Field(False, description="start with the BOS the model's prompts start with")
    model: str | None = Field(None, description="ignored: the server serves one model")


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's format)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tokens: list[int] = Field(description="token ids")
    model: str | None = Field(None, description="ignored: the server serves one model")


class RequestError(ValueError):
    """A request that is well-formed JSON but cannot be served (too long, too many steps...)."""


def check_unicode(text: str, what: str) -> None:
    """JSON may carry a lone UTF-16 surrogate (``"\\ud800"``), which is not text: a RequestError naming it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{what} holds a lone surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}), "
                           f"which is not Unicode text") from None


class Busy(RuntimeError):
    """Too much work queued, or the cache budget is full: retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(RuntimeError):
    """The server is shutting down."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's rows on their way through the worker (compared by identity)."""

    canvas: torch.Tensor  # (n, L); no rows for a likelihood request
    seeds: torch.Tensor  # (n,)
    key: tuple  # requests with equal keys can share a request batch
    sample_cfg: SampleConfig | None
    sampler: Sampler | None
    events: "asyncio.Queue"
    loop: asyncio.AbstractEventLoop
    stream: bool
    reserved: int = 0  # cache bytes counted against the budget while it is queued or running
    work: Callable[[], object] | None = None  # a likelihood request: what the worker runs between two steps
    prompts: list[list[int]] | None = None  # a likelihood request's prompts (token ids)
    mc_samples: int = 0  # a likelihood request's Monte-Carlo draws
    cancelled: bool = False
    finished: bool = False
    steps: int = 0  # steps taken (step scheduling)
    company: int = 0  # the most other requests it was decoded with in one forward
    queued: int = 0  # step events sent (written by the worker only)
    taken: int = 0  # step events read (written by the event loop only)
    admitted: float = dataclasses.field(default_factory=time.monotonic)  # when it was queued (for the metrics)

    def emit(self, kind: str, payload) -> None:
        """Queue the event ``(kind, payload)`` for the request's handler (thread-safe); cancels the job when the
        event loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the server's event loop is gone (shutting down): nobody is waiting
            self.cancelled = True


class Cancelled(Exception):
    """Raised inside a batch's step callback to abandon it: the server is stopping or every job of it is cancelled."""

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


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a request's ``prompt``: a text, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt: an empty list holds no prompt")
    return [prompt] if isinstance(prompt[0], int) else list(prompt)


def cache_bytes_per_position(model) -> int:
    """Bytes of keys and values one position of one row takes in the model's KV cache (float32, every layer;
    the same in a block-diffusion or Fast-dLLM cache); 0 for a network without one."""
    net = unwrap(model)
    if not hasattr(net, "new_cache"):
        return 0
    return tensor_bytes(net.new_cache(1, "cpu", torch.float32, capacity=1))


class StreamText:
    """The text deltas of a streamed choice: OpenAI clients append every ``text`` they receive, so a stream
    sends only text that cannot change: the committed left-to-right prefix of each step, then the rest of the
    final text. Positional changes (revealed and revised positions) travel beside it."""

    def __init__(self, service: ModelService, canvas: torch.Tensor, chat: bool, revises: bool):
        self.service, self.canvas, self.chat, self.revises = service, canvas, chat, revises
        self.sent = [""] * len(canvas)
        self.before = canvas.clone()

    def positions(self, rows: torch.Tensor) -> list[dict]:
        """Per row of ``rows`` (n, L): ``revealed`` [[position, piece]] (masked before, a token now) and
        ``changed`` [[position, piece or None]] (a token before, another token or the mask now)."""
        mask, out = self.service.tokenizer.mask_id, []
        for before, now in zip(self.before, rows):
            differ = (before != now).nonzero()[:, 0].tolist()
            pieces = self.service.pieces(now)
            out.append({"revealed": [[i, pieces[i]] for i in differ if before[i] == mask],
                        "changed": [[i, pieces[i]] for i in differ if before[i] != mask]})
        self.before = rows.clone()
        return out

    def delta(self, r: int, text: str) -> str:
        """What row ``r``'s client has not received of ``text`` (nothing if ``text`` does not extend what it
        has: the held-back text goes out once it does)."""
        if not text.startswith(self.sent[r]):
            return ""
        new, self.sent[r] = text[len(self.sent[r]):], text
        return new

    def step(self, rows: torch.Tensor) -> list[str]:
        """The text deltas of a step's rows (n, L)."""
        if self.revises:
            return [""] * len(rows)
        committed = self.service.committed_text
        return [self.delta(r, committed(self.canvas[r], row, self.chat)) for r, row in enumerate(rows)]


class ModelService:
    """A loaded model, the request -> canvas logic, and the worker: a thread of its own (``worker``), or the
    thread that calls :meth:`serve_forever`."""

    def __init__(self, loaded, config: ServeConfig | None = None, device: torch.device | str = "cpu",
                 model_precision: str = "fp32", name: str | None = None, worker: bool = True):
        self.loaded, self.config = loaded, config or ServeConfig()
        self.device = torch.device(device)
        self.name = name or model_name(loaded.source.path)
        self.model, self.tokenizer, self.run = loaded.model, loaded.tokenizer, loaded.config
        self.family = family_of(self.run)
        if not self.family.servable:
            served = ", ".join(name for name, spec in FAMILIES.items() if spec.servable)
            raise ConfigError(f"unmask serve runs {served} models, not {self.family.name}; use unmask sample for it")
        self.length = self.run.model.length
        self.default_length = min(self.run.data.length, self.length)
        self.bos = starts_with_bos(self.run.data)
        configured = self.run.sample.sampler  # a model's own decoding (LLaDA's, Dream's) is its default
        self.default_sampler = configured if configured != "auto" else self.family.default_sampler
        self.precision = resolve_precision(model_precision, self.device)
        if self.config.scheduling not in SCHEDULING:
            raise ConfigError(f"scheduling must be one of {', '.join(SCHEDULING)}, not {self.config.scheduling!r}")
        self.position_bytes = cache_bytes_per_position(self.model)
        self.prefixes = PrefixCache(self.config.prefix_cache_bytes) if self.config.prefix_cache_bytes else None
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.backlog: collections.deque[Job] = collections.deque()  # taken from the queue, not yet run
        self.current: list[Job] = []  # the jobs the worker is running (or gathering, for request batches)
        self.pending = 0
        self.reserved = 0  # cache bytes of the jobs queued and running
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "batches": 0, "steps": 0, "rows": 0, "largest_batch": 0, "restarts": 0}
        self.metrics = ServeMetrics(pending=lambda: self.pending, running=lambda: len(self.current),
                                    reserved=lambda: self.reserved, prefixes=self.prefixes)
        self.stopping = False
        self.died = ""
        self.worker = self._start_worker() if worker else threading.current_thread()

    # --- requests -----------------------------------------------------------------------------
    def metadata(self) -> dict:
        """The model's entry of ``GET /v1/models``: name, family, lengths, vocabulary, parameters, samplers, ..."""
        cfg = self.run
        return {"id": self.name, "object": "model", "family": self.family.name, "max_length": self.length,
                "default_length": self.default_length,
                "vocab_size": self.tokenizer.vocab_size, "tokenizer": self.tokenizer.describe().get("kind"),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "step": self.loaded.source.step, "soft_mask": bool(cfg.model.soft_mask_top_k),
                "samplers": samplers_for(self.family.decoding), "default_sampler": self.default_sampler,
                "chat": self.tokenizer.chat_template is not None,
                "limits": dataclasses.asdict(self.config), "device": str(self.device)}

    def prepare(self, req: CompletionRequest) -> tuple[torch.Tensor, torch.Tensor, SampleConfig, Sampler, int]:
        """(canvas (n, L), seeds (n,), sampler config, sampler, seed) for a request, or RequestError. Sizes are
        checked before anything of that size is built."""
        c = self.config
        if req.n > c.max_n:
            raise RequestError(f"n={req.n} exceeds this server's limit of {c.max_n}")
        if req.steps is not None and req.steps > c.max_steps:
            raise RequestError(f"steps={req.steps} exceeds this server's limit of {c.max_steps}")
        if req.model not in (None, "", self.name):
            raise RequestError(f"model '{req.model}' is not served here (this server serves '{self.name}')")
        sampler = req.sampler or self.default_sampler
        if sampler not in samplers_for(self.family.decoding):
            raise RequestError(f"sampler '{sampler}' does not apply to this {self.family.name} model")
        chat = isinstance(req, ChatCompletionRequest)
        bos = self.bos and not chat
        room = self.length - int(bos)
        if req.max_tokens is not None and req.max_tokens > room:
            raise RequestError(f"max_tokens={req.max_tokens} does not fit: this model's maximum is {self.length} "
                               f"tokens" + (" with BOS" if bos else ""))
        if req.echo or req.logprobs is not None or req.max_tokens == 0:
            raise RequestError("echo, logprobs and max_tokens=0 make a likelihood request: echo true, logprobs set, "
                               "max_tokens 0 or 1, not streamed" + (" (completions only)" if chat else ""))
        prompts = [] if chat else prompt_list(req.prompt)
        if len(prompts) > 1:
            raise RequestError("a generation request takes one prompt; a list of prompts is for likelihood requests "
                               "(echo with logprobs)")
        for text in [m.content for m in req.messages] if chat else [p for p in prompts if isinstance(p, str)]:
            check_unicode(text, "a message" if chat else "the prompt")
        given = None if chat or isinstance(prompts[0], str) else self.check_ids(prompts[0])
        prompt = self.chat_prompt(req) if chat else prompts[0] if given is None else ""
        infill = given is None and bool(MASK_MARK.search(prompt))
        if infill and not self.family.infills:
            raise RequestError(f"infilling ([MASK] markers) needs a model that infills, not a {self.family.name} model")
        try:
            if given is not None:
                ids = given + [self.tokenizer.mask_id] * self._new_tokens(len(given), req.max_tokens, bos)
            else:
                new = None if infill else self._new_tokens(len(encode_fixed(self.tokenizer, prompt)), req.max_tokens,
                                                           bos)
                ids = request_ids(self.tokenizer, prompt, infill, new, room)
        except (SamplingError, ValueError) as exc:
            raise RequestError(f"prompt: {exc}") from None
        length = len(ids) + int(bos)
        if req.tokens_per_step > length:
            raise RequestError(f"tokens_per_step={req.tokens_per_step} is larger than the canvas of {length}")
        steps = req.steps or max(1, ids.count(self.tokenizer.mask_id))
        if steps > c.max_steps:
            raise RequestError(f"steps={steps} exceeds this server's limit of {c.max_steps}")
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little")
        given = {k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k))
                 if v is not None}
        cfg = dataclasses.replace(self.run.sample, sampler=sampler, steps=steps, tokens_per_step=req.tokens_per_step,
                                  guidance=req.guidance, seed=seed, window=0, **given)
        try:
            sampler = make_sampler(cfg, self.loaded.objective, self.tokenizer, self.length)
            canvas = make_canvas(self.tokenizer, [ids] * req.n, length, bos)
        except SamplingError as exc:
            raise RequestError(str(exc)) from None
        need = self.cache_estimate(sampler, canvas)
        if need > self.config.cache_budget_bytes:
            raise RequestError(f"the request's cache needs {need:,} bytes; this server's cache budget is "
                               f"{self.config.cache_budget_bytes:,}")
        return canvas, row_seeds(seed, req.n), cfg, sampler, seed

    def cache_estimate(self, sampler: Sampler, canvas: torch.Tensor) -> int:
        """The bytes a decoding of ``canvas`` (n, L) by ``sampler`` may keep in caches: keys and values of every
        position its caches may hold (:meth:`~unmask.samplers.engine.Sampler.cache_positions`), every row: an
        upper bound of a KV, Fast-dLLM or block-diffusion cache; 0 for a sampler that keeps none."""
        return self.position_bytes * len(canvas) * sampler.cache_positions(canvas.shape[1])

    def chat_prompt(self, req: ChatCompletionRequest) -> str:
        """The prompt text of a chat request under the model's chat template."""
        try:
            return chat_prompt(self.tokenizer, [m.model_dump() for m in req.messages])
        except SamplingError as exc:
            raise RequestError(f"{exc}; use /v1/completions" if self.tokenizer.chat_template is None else str(exc)) \
                from None

    def _new_tokens(self, count: int, max_tokens: int | None, bos: bool) -> int:
        """The tokens to generate after a prompt of ``count`` tokens: ``max_tokens``, or up to the length the
        model was trained on."""
        used = count + int(bos)
        if max_tokens is None:
            if used >= self.length:
                raise RequestError(f"a prompt of {count} tokens leaves no room in this model's maximum of "
                                   f"{self.length}")
            if used >= self.default_length:
                raise RequestError(f"a prompt of {count} tokens leaves no room in the {self.default_length} "
                                   f"tokens this model was trained on; set max_tokens (at most "
                                   f"{self.length - used})")
            max_tokens = self.default_length - used
        if used + max_tokens > self.length:
            raise RequestError(f"prompt and completion take {used + max_tokens} tokens; this model's maximum "
                               f"is {self.length}")
        return max_tokens

    def check_ids(self, ids: list[int]) -> list[int]:
        """A prompt given as token ids, checked: ids of the vocabulary, not the mask."""
        vocab = self.tokenizer.vocab_size
        for i in ids:
            if not 0 <= i < vocab:
                raise RequestError(f"prompt: token id {i} is not in this model's vocabulary of {vocab}")
            if i == self.tokenizer.mask_id:
                raise RequestError(f"prompt: token id {i} is the mask token; mark gaps with [MASK] in a text prompt")
        return list(ids)

    def prepare_likelihood(self, req: CompletionRequest) -> tuple[Callable[[], list[TokenScores]], list[list[int]],
                                                                   int, int]:
        """A likelihood request (``echo`` with ``logprobs``, ``max_tokens`` 0 or 1): (the work, each prompt's ids,
        Monte-Carlo draws, seed), or RequestError; its cost in network rows is bounded before any work."""
        if isinstance(req, ChatCompletionRequest):
            raise RequestError("likelihood requests (echo with logprobs) are served by /v1/completions")
        if not req.echo or req.logprobs is None:
            raise RequestError("log-probabilities are served for echoed prompts: set echo true and logprobs")
        if req.stream or req.n != 1 or (req.max_tokens or 0) > 1:
            raise RequestError("a likelihood request scores its prompts: max_tokens 0 or 1 (the most likely next "
                               "token), n 1, not streamed")
        if req.temperature or req.top_p is not None or req.top_k is not None or req.guidance or req.sampler or \
                req.steps is not None or req.tokens_per_step != 1:
            raise RequestError("sampling settings do not apply to a likelihood request (the next token it returns "
                               "is the most likely one: temperature 0)")
        if not self.family.likelihood:
            raise RequestError(f"a {self.family.name} model has no likelihood to serve")
        if req.model not in (None, "", self.name):
            raise RequestError(f"model '{req.model}' is not served here (this server serves '{self.name}')")
        samples = req.mc_samples or self.config.mc_samples
        bound = self.loaded.objective.bound != "exact"
        prompts, rows = [], 0
        for prompt in prompt_list(req.prompt):
            if isinstance(prompt, str):
                check_unicode(prompt, "the prompt")
                try:
                    ids = encode_fixed(self.tokenizer, prompt)
                except (SamplingError, ValueError) as exc:
                    raise RequestError(f"prompt: {exc}") from None
            else:
                ids = self.check_ids(prompt)
            if not ids:
                raise RequestError("an empty prompt has no token to score")
            if int(self.bos) + len(ids) + (req.max_tokens or 0) > self.length:
                raise RequestError(f"a prompt of {len(ids)} tokens" + (" and the next token" if req.max_tokens else "")
                                   + f" does not fit this model's maximum of {self.length}"
                                   + (" with BOS" if self.bos else ""))
            prompts.append(ids)
            rows += len(ids) * (samples + 1) + 1 if bound else 1
        if rows > self.config.max_likelihood_rows:
            raise RequestError(f"scoring these prompts takes {rows} network rows (prompt tokens x (mc_samples + 1)); "
                               f"this server's limit is {self.config.max_likelihood_rows}")
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little")
        bos = [self.tokenizer.bos_id] if self.bos else []
        model, objective = self.model, self.loaded.objective

        def work() -> list[TokenScores]:
            # forwards of about --max-step-tokens positions (at least one sequence's draws)
            return [token_loglikelihoods(model, objective, ids, bos, req.logprobs, samples, seed,
                                         max(samples, self.config.max_step_tokens // (len(bos) + len(ids))),
                                         self.precision, self.device, next_token=bool(req.max_tokens))
                    for ids in prompts]
        return work, prompts, samples, seed

    async def submit(self, req: CompletionRequest) -> tuple[Job, int]:
        """Queue a request: a slot first (Busy, Unavailable), then its canvas (or, for a likelihood request, its
        work), built off the event loop."""
        self.check_worker()
        with self.lock:
            if self.stopping:
                raise Unavailable("the server is shutting down")
            if self.pending >= self.config.max_pending:
                raise Busy(f"{self.pending} requests are queued or running (limit {self.config.max_pending}); "
                           f"retry later", self.retry_after())
            self.pending += 1
        likelihood = req.echo or req.logprobs is not None
        try:
            if likelihood:
                work, prompts, samples, seed = await asyncio.to_thread(self.prepare_likelihood, req)
            else:
                canvas, seeds, cfg, sampler, seed = await asyncio.to_thread(self.prepare, req)
        except BaseException:
            with self.lock:
                self.pending -= 1
            raise
        if likelihood:
            job = Job(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), (object(),), None, None,
                      asyncio.Queue(), asyncio.get_running_loop(), False, work=work, prompts=prompts,
                      mc_samples=samples)
        else:
            key = (dataclasses.astuple(dataclasses.replace(cfg, seed=0)), canvas.shape[1])
            job = Job(canvas, seeds, key, cfg, sampler, asyncio.Queue(), asyncio.get_running_loop(), req.stream,
                      reserved=self.cache_estimate(sampler, canvas))
        with self.lock:  # close() drains the queue after it sets stopping: nothing may arrive later
            problem = None
            if self.stopping:
                problem = Unavailable("the server is shutting down")
            elif self.reserved + job.reserved > self.config.cache_budget_bytes:
                problem = Busy(f"the cache budget is full ({self.reserved:,} of {self.config.cache_budget_bytes:,} "
                               f"bytes held; this request needs {job.reserved:,}); retry later", self.retry_after())
            if problem is not None:
                self.pending -= 1
                raise problem
            self.reserved += job.reserved
            self.stats["requests"] += 1
            self.jobs.put(job)
        return job, seed

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the mean time requests took lately (at least 1)."""
        return max(1, math.ceil(self.metrics.recent_latency()))

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
            self.worker = self._start_worker()
        return self._restarted()

    def _restarted(self) -> str:
        """Answer 503 to the requests a worker that died was running; say why it stopped."""
        with self.lock:
            lost, self.current = self.current, []
            reason, self.died = self.died or "no reason given", ""
            self.stats["restarts"] += 1
        for job in lost:
            self._finish(job, "unavailable", f"the sampling worker stopped ({reason}) and was restarted; retry")
        return f"the sampling worker had stopped ({reason}); it was restarted"

    def serve_forever(self) -> None:
        """Run the worker in the calling thread, the main thread of ``unmask serve`` (a service made with
        ``worker=False``), until :meth:`close` or an interrupt (KeyboardInterrupt, SystemExit: raised); a worker
        loop that dies otherwise is restarted here. On CPU, torch's OpenMP runs many small kernels about twice as
        fast from the main thread as from another one (measured: 0.08 against 0.16 s per request of a nano
        model), so a server decodes there and answers HTTP from a thread of its own."""
        self.worker = threading.current_thread()
        while not self.stopping:
            self._work(interrupts=(KeyboardInterrupt, SystemExit))
            if self.died and not self.stopping:
                self._restarted()

    def _work(self, interrupts: tuple[type[BaseException], ...] = ()) -> None:
        """Run requests by the configured scheduling until closed; an error fails the requests it touched only;
        ``interrupts`` are raised, any other exception ends the loop (recorded in ``died``)."""
        torch.set_grad_enabled(False)
        try:
            if self.config.scheduling == "step":
                self._work_steps()
                return
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
        except BaseException as exc:  # the loop ends here; check_worker or serve_forever reports it and restarts it
            if isinstance(exc, interrupts):
                raise
            self.died = f"{type(exc).__name__}: {exc}"

    # --- step scheduling: continuous batching over the decoding engine ----------------------------------
    def _work_steps(self) -> None:
        """Continuous batching. Between two steps, finished and cancelled requests leave and queued ones join
        (first come, first served: a request waits while the one before it does not fit the step's rows
        ``max_batch_rows`` and positions ``max_step_tokens``, so none is overtaken forever); each step is one
        :meth:`~unmask.samplers.engine.DecodingEngine.step`: one network evaluation for every running request,
        denoiser calls of every request in one forward (ragged canvases padded, see the engine), each request
        then advanced by its own sampler. A request therefore finishes after its own number of steps,
        whatever else runs: a long request does not hold back short ones. Each row draws from its own seed,
        so a request's tokens do not depend on what it was batched with or when it joined. An error in a
        step fails the requests of that step, the others queued go on."""
        engine = DecodingEngine(self.model, self.prefixes)
        running: dict[Handle, Job] = {}
        while not self.stopping:
            try:
                self._admit(engine, running)
            except Exception:  # the queue itself failed: no request is lost, the next round reads it again
                time.sleep(0.01)
                continue
            self._leave(engine, running)
            if not engine.active:
                continue
            for job in running.values():
                job.company = max(job.company, len(running) - 1)
            rows = sum(len(job.canvas) for job in running.values())
            try:
                with autocast(self.device, self.precision):
                    finished = engine.step()
            except Exception as exc:
                for job in running.values():
                    self._finish(job, "error", f"{type(exc).__name__}: {exc}")
                engine, running = DecodingEngine(self.model, self.prefixes), {}
                self.current = []
                continue
            with self.lock:
                self.stats["steps"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(running))
            self.metrics.step(rows, sum(h.cache_bytes() for h in engine.handles) if self.reserved else 0)
            for handle in finished:
                self._done(handle, running.pop(handle))
            self.current = list(running.values())

    def _admit(self, engine: DecodingEngine, running: dict) -> None:
        """Start the queued requests that fit this step, in their order (waiting up to 0.2 s for one when
        nothing runs)."""
        rows = sum(len(job.canvas) for job in running.values())
        positions = sum(job.canvas.numel() for job in running.values())
        while not self.stopping:
            if not self.backlog:
                try:
                    self.backlog.append(self.jobs.get(timeout=0.2) if not running else self.jobs.get_nowait())
                except queue.Empty:
                    return
            job = self.backlog[0]
            if not job.cancelled and running and (rows + len(job.canvas) > self.config.max_batch_rows or
                                                  positions + job.canvas.numel() > self.config.max_step_tokens):
                return
            self.backlog.popleft()
            if job.cancelled:
                self._finish(job, "cancelled", None)
                continue
            if job.work is not None:  # a likelihood request runs whole, between two steps
                self._score(job)
                continue
            try:
                with autocast(self.device, self.precision):
                    handle = engine.add(job.sampler, job.canvas.to(self.device), job.seeds.to(self.device),
                                        self._frames(job) if job.stream else None)
            except Exception as exc:
                self._finish(job, "error", f"{type(exc).__name__}: {exc}")
                continue
            running[handle] = job
            self.current = list(running.values())
            rows, positions = rows + len(job.canvas), positions + job.canvas.numel()

    def _score(self, job: Job) -> None:
        """Run a likelihood request's work and answer it."""
        start = time.perf_counter()
        try:
            scores = job.work()
        except Exception as exc:
            self._finish(job, "error", f"{type(exc).__name__}: {exc}")
            return
        self._finish(job, "done", {"scores": scores, "seconds": time.perf_counter() - start})

    def _leave(self, engine: DecodingEngine, running: dict) -> None:
        """Requests that finished on joining, or were cancelled, leave the engine."""
        for handle, job in list(running.items()):
            if handle.done or job.cancelled:
                engine.remove(handle)
                del running[handle]
                if handle.done:
                    self._done(handle, job)
                else:
                    self._finish(job, "cancelled", None)
        self.current = list(running.values())

    def _frames(self, job: Job):
        """The step callback of a streamed job (none for the others: a step's canvas is composed only for a
        stream): counts its steps and queues a copy of its canvas while the stream keeps up (at most
        ``max_stream_lag`` unread)."""
        def on_step(x: torch.Tensor) -> None:
            job.steps += 1
            if job.queued - job.taken < self.config.max_stream_lag:
                if not job.queued:
                    self.metrics.first_step.observe(time.monotonic() - job.admitted)
                job.queued += 1
                job.emit("step", (job.steps, x.cpu().clone()))
        return on_step

    def _done(self, handle: Handle, job: Job) -> None:
        result = handle.result
        with self.lock:
            self.stats["rows"] += len(job.canvas)
        self.metrics.generated(result.generated)
        self._finish(job, "done", {"tokens": result.tokens.cpu(), "steps": job.steps, "row_nfe": result.row_nfe.cpu(),
                                   "seconds": result.seconds, "batch_requests": job.company + 1})

    # --- request scheduling: batches of whole requests ---------------------------------------------------
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
        if self.config.scheduling == "serial":
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
        if batch[0].work is not None:  # a likelihood request (its key is its own: alone in its batch)
            self._score(batch[0])
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
                    if not batch[i].queued:
                        self.metrics.first_step.observe(time.monotonic() - batch[i].admitted)
                    batch[i].queued += 1
                    batch[i].emit("step", (steps, x[bounds[i]:bounds[i + 1]].clone()))

        try:
            sampler = batch[0].sampler
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
        self.metrics.batch(len(canvas))
        self.metrics.generated(result.generated)
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
            self.reserved -= job.reserved
        self.metrics.answered(kind, time.monotonic() - job.admitted)
        job.emit(kind, payload)

    def close(self) -> None:
        """Stop the worker; every queued or running request is answered 503."""
        with self.lock:
            self.stopping = True
        if self.worker is not threading.current_thread():
            self.worker.join(timeout=5)
        held = list(self.current) + list(self.backlog)
        while True:
            try:
                held.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for job in held:
            self._finish(job, "unavailable", "the server is shutting down")

    # --- the tokenizer over HTTP (vLLM's /tokenize, /detokenize, /tokenizer_info: lm-eval's remote tokenizer) ---
    def special_names(self) -> dict[str, int]:
        """The written form of each special token but the mask (BOS, EOS, PAD) and its id."""
        tok = self.tokenizer
        return {tok.decode([i], skip_special=False): i for i in sorted(tok.special_token_ids() - {tok.mask_id})}

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``, its special tokens' written forms read as those tokens; with
        ``add_special_tokens``, the BOS the model's prompts start with. RequestError for text the tokenizer
        cannot encode."""
        check_unicode(text, "the text")
        names = self.special_names()
        pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True) if n))
        ids = [self.tokenizer.bos_id] if add_special_tokens and self.bos else []
        try:
            at = 0
            for match in pattern.finditer(text) if pattern.pattern else ():
                ids += encode_fixed(self.tokenizer, text[at:match.start()]) + [names[match.group()]]
                at = match.end()
            ids += encode_fixed(self.tokenizer, text[at:])
        except (SamplingError, ValueError) as exc:
            raise RequestError(f"text: {exc}") from None
        return ids

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids (special tokens written out), RequestError for an id outside the vocabulary."""
        vocab = self.tokenizer.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is not in this model's vocabulary of {vocab}")
        return self.tokenizer.decode(ids, skip_special=False) if ids else ""

    def tokenizer_info(self) -> dict:
        """What a remote-tokenizer client needs: the special tokens' written forms, the maximum length, the chat
        template."""
        tok = self.tokenizer
        name = lambda i: tok.decode([i], skip_special=False)  # noqa: E731
        return {"tokenizer_class": tok.describe().get("kind"), "bos_token": name(tok.bos_id),
                "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id), "model_max_length": self.length,
                "chat_template": tok.chat_template}

    # --- rendering ------------------------------------------------------------------------------
    def likelihood_choices(self, job: Job, scores: list[TokenScores]) -> list[dict]:
        """OpenAI's echoed ``logprobs`` of each prompt of a likelihood request (and of the next token when one
        was asked for), with unmask's extension: whether the terms are a bound, and each suffix's log-likelihood
        and Monte-Carlo standard error."""
        tok = self.tokenizer
        piece = lambda i: tok.decode([i], skip_special=False)  # noqa: E731
        choices = []
        for index, (ids, score) in enumerate(zip(job.prompts, scores)):
            ids, values, tops = list(ids), list(score.logprobs), list(score.top)
            if score.next_token is not None:
                ids.append(score.next_token[0])
                values.append(score.next_token[1])
                tops.append(score.next_token[2])
            pieces = [piece(i) for i in ids]
            offsets = [0]
            for p in pieces[:-1]:
                offsets.append(offsets[-1] + len(p))
            choices.append({"index": index, "text": "".join(pieces), "finish_reason": "length",
                            "logprobs": {"tokens": pieces, "token_logprobs": values,
                                         "top_logprobs": [{piece(i): v for i, v in top} for top in tops],
                                         "text_offset": offsets},
                            "unmask": {"bound": score.bound, "suffix_logprobs": score.suffix,
                                       "suffix_stderr": score.stderr}})
        return choices

    def pieces(self, row: torch.Tensor) -> list[str | None]:
        """One string per position (``None`` where masked; special tokens as empty strings)."""
        tok = self.tokenizer
        specials = tok.special_ids - {tok.mask_id}
        return [None if i == tok.mask_id else ("" if i in specials else tok.decode([i], skip_special=False))
                for i in row.tolist()]

    def answer(self, canvas: torch.Tensor, row: torch.Tensor) -> tuple[str, str]:
        """A chat answer: the generated ids up to the first special token (end of turn), and the finish
        reason (``stop`` when the model ended its turn, else ``length``)."""
        text, ended = chat_answer(self.tokenizer, row[canvas == self.tokenizer.mask_id].tolist())
        return text, "stop" if ended else "length"

    def committed_text(self, canvas: torch.Tensor, row: torch.Tensor, chat: bool) -> str:
        """The text of a partly decoded ``row`` that can no longer change, read left to right: the decoded
        positions before the first still-masked one (a chat answer up to its end of turn), without a trailing
        partial character. The caller streams it only for samplers that never revise a revealed token."""
        masked = (row == self.tokenizer.mask_id).nonzero()
        first = int(masked[0, 0]) if len(masked) else len(row)
        generated = (canvas == self.tokenizer.mask_id).nonzero()[:, 0]
        if chat:
            text, _ = chat_answer(self.tokenizer, row[generated[generated < first]].tolist())
        elif len(generated) and int(generated[-1]) - int(generated[0]) + 1 == len(generated) and \
                int(generated[-1]) == len(row) - 1:
            text = self.tokenizer.decode(row[int(generated[0]):first])
        else:
            text = self.tokenizer.decode(row[:first])
        return text.rstrip("\ufffd")

    def completion_text(self, canvas: torch.Tensor, row: torch.Tensor) -> str:
        """The generated text: the continuation after a prompt, or the whole filled text for infilling."""
        generated = (canvas == self.tokenizer.mask_id).nonzero()[:, 0]
        if len(generated) and int(generated[-1]) - int(generated[0]) + 1 == len(generated) and \
                int(generated[-1]) == len(row) - 1:
            return self.tokenizer.decode(row[int(generated[0]):])
        return self.tokenizer.decode(row)
