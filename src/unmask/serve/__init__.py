"""HTTP serving: an OpenAI-style completions API with step-level continuous batching, likelihoods, edit-aware
server-sent-event streams, and a web page that shows text being unmasked.

    unmask serve MODEL [--host 127.0.0.1] [--port 8000] [--scheduling step|request|serial]

Endpoints (FastAPI on uvicorn; the serving guide, docs/guides/serving.md, has every field):

* ``GET /`` the page (``assets/serve.html``, no build step);
* ``GET /health``: 200 with the queue and counters while the sampling worker runs, 503 when it had
  stopped (see below) or the server is shutting down; ``GET /metrics``: Prometheus' text format;
* ``GET /v1/models`` model metadata; the model's id is the name of its folder (the run folder for a
  checkpoint, ``org/name`` for a hub download), never a local path;
* ``POST /v1/completions``: ``prompt`` (text, whose ``[MASK]`` / ``[MASK*n]`` markers make it an infilling
  request, or token ids), ``max_tokens``, the sampling settings, ``seed``, ``n``, ``stream``; with ``echo``
  and ``logprobs`` (``max_tokens`` 0 or 1) the log-probability of every prompt token, exact for AR models
  and a telescoping split of the NELBO bound for diffusion models (a list of prompts allowed);
  ``POST /v1/chat/completions``: ``messages`` in the model's chat template;
* ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``: the tokenizer in vLLM's format (what
  lm-eval's remote tokenizer reads).

Requests are validated before any work. JSON types are strict (``"stream": "yes"`` or ``"n": "2"`` is an
error, not a coercion), numbers finite, unknown fields an error. Sizes, token ids, likelihood rows and cache
bytes are checked against the model and the limits of :class:`ServeConfig` before a canvas is built, and a
body over ``max_body_bytes`` gets 413 without being read. Tokenizing and building the canvas run off the
event loop, so ``/health`` answers meanwhile. Every error response (400, 404, 405, 413, 422, 429, 500, 503,
504) is ``{"error": {"type", "message"}}`` with a one-line message; a stream that fails once started ends
with such an object before ``[DONE]``.

One worker runs every request (:class:`ModelService`; ``unmask serve`` runs it in the main thread and HTTP in
another). With step scheduling (the default) requests join and leave between denoising steps of one decoding
engine, every step one forward over all of them; every row has its own random stream, so a seeded request
gives the same tokens alone or under any load. Caches live with their request between steps and are reserved
against ``cache_budget_bytes`` (429 with ``Retry-After`` when full); prompts of causal and block-diffusion
models share their prefixes' keys and values (:mod:`unmask.samplers.prefix_cache`). ``max_pending`` bounds the
queued and running requests (429 beyond it) and ``timeout_s`` each request (504). A request whose client
disconnects or times out leaves at the next step. A streaming client more than ``max_stream_lag`` events
behind misses intermediate events (the final event still carries the result), and one that stops reading is
dropped at its deadline, so no request holds memory past ``timeout_s``.

Health: an error in a step fails that step's requests (500) and the worker carries on. Should the worker
die anyway, whoever notices first (``/health``, a new request, or a request waiting for its result)
restarts it: the requests it was running get 503, queued ones are kept, and a ``/health`` that finds it dead
answers 503 with the reason; ``restarts`` in ``/health`` counts them. :meth:`ModelService.close` (shutdown)
answers every queued or running request with 503.
"""
