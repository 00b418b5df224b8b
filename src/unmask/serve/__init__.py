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
