"""The HTTP server, exercised over real loopback HTTP: completions, streams whose last canvas equals
the non-streaming result, infilling, request validation (4xx with a message, server healthy after),
batching that does not change results, limits and timeouts, the documented error shape everywhere,
requests refused before they cost anything, a worker that survives bad batches and is restarted when
it dies, cancellation of abandoned requests, shutdown, and the web page in headless Chromium."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import queue
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from unmask.checkpoints.checkpoint import save_checkpoint
from unmask.config import load_config
from unmask.data.tokenization import build_tokenizer
from unmask.families import build_model
from unmask.pipeline import from_pretrained
from unmask.serve.app import EventStream, running_server
from unmask.serve.service import (
    CompletionRequest,
    ModelService,
    ServeConfig,
    model_name,
)

from toys import TINY  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


def make_checkpoint(root: Path, family: str = "mdlm", overrides: tuple[str, ...] = ()) -> Path:
    """A tiny run of ``family`` with random weights (length 32, the alphabet above), in ``root/family``."""
    cfg = load_config(None, TINY + [f"family={family}", f"run_dir={root / family}", "data.tokenizer=char",
                                    "data.frame=false", f"data.alphabet={json.dumps(ALPHABET)}", *overrides])
    tokenizer = build_tokenizer("char", alphabet=cfg.data.alphabet)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return save_checkpoint(Path(cfg.run_dir) / "checkpoints", 3, model.state_dict(), cfg, tokenizer)


class Slow(torch.nn.Module):
    """A model that takes ``delay`` seconds per forward pass (for limits and timeouts)."""

    def __init__(self, inner, delay):
        super().__init__()
        self.inner, self.delay = inner, delay
        self.time_conditioning, self.soft_mask = False, None  # the denoiser interface of a binary DiT

    def forward(self, *args, **kw):
        time.sleep(self.delay)
        return self.inner(*args, **kw)


class Failing(torch.nn.Module):
    """A model whose first ``times`` forward passes raise ``error``."""

    def __init__(self, inner, error, times=1):
        super().__init__()
        self.inner, self.error, self.times = inner, error, times
        self.time_conditioning, self.soft_mask = False, None  # the denoiser interface of a binary DiT

    def forward(self, *args, **kw):
        if self.times:
            self.times -= 1
            raise self.error
        return self.inner(*args, **kw)


class FlakyQueue(queue.Queue):
    """A job queue whose next ``get`` raises ``error`` (once)."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def get(self, *args, **kw):
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return super().get(*args, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"mdlm": make_checkpoint(root, "mdlm"), "ar": make_checkpoint(root, "ar")}


@pytest.fixture(scope="module")
def server(checkpoints):
    service = ModelService(from_pretrained(checkpoints["mdlm"]), ServeConfig(batch_window_ms=60, max_n=4,
                                                                               max_steps=200))
    with running_server(service) as url:
        yield url, service
    service.close()


def service_for(checkpoint, delay: float = 0.0, **limits) -> ModelService:
    loaded = from_pretrained(checkpoint)
    if delay:
        loaded.model = Slow(loaded.model, delay)
    return ModelService(loaded, ServeConfig(**limits))


def post(url, body, timeout=60, **kw):
    """POST ``body`` as JSON, written by ``json.dumps`` (which escapes lone surrogates as a client may)."""
    return httpx.post(f"{url}/v1/completions", content=json.dumps(body), timeout=timeout,
                      headers={"content-type": "application/json"}, **kw)


def assert_error(r, status: int, words: str = "") -> dict:
    """``r`` is ``status`` with the documented ``{"error": {"type", "message"}}`` body, one line."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    assert isinstance(body["error"]["message"], str) and "\n" not in body["error"]["message"]
    assert words in body["error"]["message"], body
    return body["error"]


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def canvases(events: list) -> list:
    """The canvases (choices x positions, None where masked) after each event of a stream (its first event carries
    them, later ones the positions revealed and changed), as the page rebuilds them."""
    frames = []
    for event in events:
        if event == "[DONE]":
            break
        rows = []
        for i, choice in enumerate(event["choices"]):
            row = list(choice["unmask"]["canvas"]) if "canvas" in choice["unmask"] else list(frames[-1][i])
            for position, piece in choice["unmask"].get("revealed", []) + choice["unmask"].get("changed", []):
                row[position] = piece
            rows.append(row)
        frames.append(rows)
    return frames


def streamed_text(events: list, index: int = 0) -> str:
    """What an OpenAI client makes of a completion stream: the text deltas of choice ``index``, appended."""
    return "".join(e["choices"][index]["text"] for e in events if e != "[DONE]")


def stream_events(url, body) -> list:
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        buffer = ""
        for chunk in r.iter_text():
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                assert block.startswith("data: "), block
                data = block[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_health_metadata_and_page(server):
    url, _ = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    info = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert info["family"] == "mdlm" and info["max_length"] == 32 and "first_hitting" in info["samplers"]
    assert info["id"] == "mdlm" and info["limits"]["max_body_bytes"] == 1 << 20
    page = httpx.get(url)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/completions" in page.text


def test_metrics_count_requests_tokens_batches_and_latencies(checkpoints):
    """``GET /metrics`` in Prometheus' text format (parsed by its own client), on a server of its own."""
    from prometheus_client.parser import text_string_to_metric_families

    service = service_for(checkpoints["mdlm"])
    with running_server(service) as url:
        assert post(url, {"prompt": "the ", "max_tokens": 8, "n": 2, "seed": 1, "steps": 4}).status_code == 200
        events = stream_events(url, {"prompt": "a", "max_tokens": 6, "seed": 2, "steps": 3})
        assert events[-1] == "[DONE]"
        assert_error(post(url, {"prompt": "x", "steps": 10 ** 6}), 400)  # refused before admission: not counted
        r = httpx.get(f"{url}/metrics")
    service.close()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}
    assert samples["unmask_requests_total", (("outcome", "done"),)] == 2
    assert samples["unmask_generated_tokens_total", ()] == 2 * 8 + 6
    # one observation per step: the request of 2 rows, then the one of 1 row, each alone
    steps = service.stats["steps"]
    assert samples["unmask_batch_rows_count", ()] == steps and steps < samples["unmask_batch_rows_sum", ()] < 2 * steps
    assert samples["unmask_cache_bytes", ()] == 0 and samples["unmask_cache_reserved_bytes", ()] == 0
    assert samples["unmask_request_seconds_count", ()] == 2 and samples["unmask_request_seconds_sum", ()] > 0
    assert samples["unmask_time_to_first_step_seconds_count", ()] == 1
    assert samples["unmask_requests_pending", ()] == 0 and samples["unmask_requests_running", ()] == 0
    assert samples["unmask_generated_tokens_per_second", ()] > 0


def test_completion_is_reproducible_by_seed(server):
    url, _ = server
    body = {"prompt": "the ", "max_tokens": 12, "seed": 7, "sampler": "ancestral", "steps": 6}
    a = post(url, body)
    assert a.status_code == 200, a.text
    out = a.json()
    choice = out["choices"][0]
    assert out["object"] == "text_completion" and len(choice["tokens"]) == 16 and choice["nfe"] <= 6
    assert choice["text"] == "".join(choice["tokens"][4:])  # special tokens are empty pieces, and left out
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    assert out["unmask"]["seed"] == 7 and choice["tokens"][:4] == list("the ")
    assert post(url, body).json()["choices"][0]["text"] == choice["text"]
    other = [post(url, {**body, "seed": s}).json()["choices"][0]["text"] for s in (8, 9)]
    assert any(t != choice["text"] for t in other)


@pytest.mark.parametrize("sampler", ["first_hitting", "ancestral", "confidence"])
def test_stream_events_end_at_the_non_streaming_result(server, sampler):
    url, _ = server
    body = {"prompt": "and ", "max_tokens": 10, "seed": 11, "sampler": sampler, "steps": 5, "n": 2}
    events = stream_events(url, body)
    assert events[-1] == "[DONE]"
    final, chunks = events[-2], events[:-2]
    assert final["unmask"]["final"] and all(e["object"] == "text_completion" for e in events[:-1])
    assert [e["step"] for e in chunks] == list(range(len(chunks))) and len(chunks) >= 2
    frames = canvases(events)
    masks = [sum(t is None for t in frame[0]) for frame in frames[:-1]]
    assert masks[0] == 10 and masks == sorted(masks, reverse=True)
    assert all(len(frame) == 2 and len(frame[1]) == 14 for frame in frames)
    assert frames[-2] == frames[-1] == [c["unmask"]["tokens"] for c in final["choices"]]
    assert [c["finish_reason"] for c in final["choices"]] == ["length", "length"]
    plain = post(url, body).json()
    assert [streamed_text(events, i) for i in range(2)] == [c["text"] for c in plain["choices"]]
    assert [c["unmask"]["text"] for c in final["choices"]] == [c["text"] for c in plain["choices"]]
    assert [c["tokens"] for c in plain["choices"]] == [c["unmask"]["tokens"] for c in final["choices"]]


def test_infilling_by_mask_markers_and_guidance(server):
    url, _ = server
    out = post(url, {"prompt": "to be, [MASK*5] not", "seed": 1}).json()
    text = out["choices"][0]["text"]
    assert text.startswith("to be, ") and text.endswith(" not") and len(out["choices"][0]["tokens"]) == 7 + 5 + 4
    guided = post(url, {"prompt": "to be, [MASK*5] not", "seed": 1, "guidance": 2.0}).json()["choices"][0]["text"]
    assert guided.startswith("to be, ") and guided != text


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "a", "max_tokens": 4, "temprature": 1.0}, 422, "temprature"),
    ({"prompt": "a", "temperature": -1}, 422, "temperature"),
    ({"prompt": "a", "top_p": 0}, 422, "top_p"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens=0"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "a", "sampler": "magic"}, 422, "sampler"),
    ({"prompt": "a" * 40}, 400, "maximum of 32"),
    ({"prompt": "a" * 30, "max_tokens": 4}, 400, "maximum is 32"),
    ({"prompt": "a", "max_tokens": 40}, 400, "maximum is 32"),
    ({"prompt": "a", "steps": 1000}, 400, "steps=1000"),
    ({"prompt": "a", "n": 9}, 400, "n=9"),
    ({"prompt": "a", "sampler": "ar"}, 400, "does not apply"),
    ({"prompt": "ABC"}, 400, "prompt"),
    ({"prompt": "a", "model": "other"}, 400, "not served"),
    ({"prompt": "a", "tokens_per_step": 50, "max_tokens": 4}, 400, "tokens_per_step"),
    ({"prompt": "a", "max_tokens": 2, "stream": "yes"}, 422, "stream"),  # strict JSON types, no coercion
    ({"prompt": "a", "max_tokens": "2"}, 422, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.0}, 422, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2, "n": True}, 422, "n"),
    ({"prompt": "a", "max_tokens": 2, "temperature": "1"}, 422, "temperature"),
    ({"prompt": "a", "max_tokens": 2, "seed": 1.5}, 422, "seed"),
    ({"prompt": "a", "max_tokens": 2, "seed": 2 ** 63}, 422, "seed"),
    ({"prompt": "a", "max_tokens": 10 ** 30}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2, "n": 10 ** 30}, 400, "n="),
    ({"prompt": "a", "max_tokens": 2, "steps": 10 ** 30}, 400, "steps="),
    ({"prompt": "a", "max_tokens": 2, "tokens_per_step": 10 ** 30}, 400, "tokens_per_step"),
    ({"prompt": "a[MASK*40]"}, 400, "32"),
])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_stays_healthy(server, body, status, words):
    url, _ = server
    assert_error(post(url, body), status, words)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert post(url, {"prompt": "a", "max_tokens": 3, "seed": 1}).status_code == 200


def test_malformed_json_wrong_method_and_unknown_paths_get_the_documented_error_shape(server):
    url, _ = server
    json_type = {"Content-Type": "application/json"}
    assert_error(httpx.post(f"{url}/v1/completions", content=b"{not json", headers=json_type), 422, "JSON")
    for body in (b"[1, 2]", b"null", b"7", b'"text"'):
        assert_error(httpx.post(f"{url}/v1/completions", content=body, headers=json_type), 422, "JSON object")
    assert_error(httpx.post(f"{url}/v1/completions", content=b'{"prompt": "a"}',
                            headers={"Content-Type": "text/plain"}), 422, "JSON object")
    assert_error(httpx.post(f"{url}/v1/completions"), 422, "JSON object")
    assert_error(httpx.post(f"{url}/v1/completions", content=b"[" * 100_000, headers=json_type), 400)
    assert_error(httpx.get(f"{url}/v1/completions"), 405)
    assert_error(httpx.post(f"{url}/health"), 405)
    assert_error(httpx.get(f"{url}/no/such/path"), 404)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_concurrent_requests_are_batched_without_changing_results(server):
    url, service = server
    bodies = [{"prompt": "we ", "max_tokens": 8, "seed": s, "sampler": "first_hitting"} for s in range(6)]
    bodies += [{"prompt": "we ", "max_tokens": 5, "seed": 1, "sampler": "first_hitting"},  # other shapes
               {"prompt": "we ", "max_tokens": 8, "seed": 2, "sampler": "ancestral", "steps": 4}]
    alone = [post(url, b).json()["choices"][0]["text"] for b in bodies]
    before = service.stats["largest_batch"]
    results = [None] * len(bodies)

    def call(i):
        results[i] = post(url, bodies[i]).json()

    window = service.config.batch_window_ms
    service.config.batch_window_ms = 3000  # wide enough for every thread to arrive, even on a loaded machine
    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        service.config.batch_window_ms = window
    assert [r["choices"][0]["text"] for r in results] == alone
    assert max(r["unmask"]["batched_with"] for r in results) >= 1
    assert service.stats["largest_batch"] >= max(2, before)


def test_ar_model_streams_left_to_right(checkpoints):
    service = ModelService(from_pretrained(checkpoints["ar"]))
    with running_server(service) as url:
        events = stream_events(url, {"prompt": "a", "max_tokens": 5, "seed": 2})
        masks = [sum(t is None for t in frame[0]) for frame in canvases(events[:-2])]
        assert masks == [5, 4, 3, 2, 1, 0]
        # left to right: every step commits its token, so the text streams a piece per step (empty for a
        # special token)
        deltas = [e["choices"][0]["text"] for e in events[1:-2]]
        assert sum(map(bool, deltas)) >= 3 and "".join(deltas) == events[-2]["choices"][0]["unmask"]["text"]
        assert post(url, {"prompt": "a[MASK]b"}).status_code == 400
        assert post(url, {"prompt": "a", "guidance": 1.0}).status_code == 400
    service.close()


def test_limits_busy_and_timeout(checkpoints):
    loaded = from_pretrained(checkpoints["mdlm"])
    loaded.model = Slow(loaded.model, 0.2)
    service = ModelService(loaded, ServeConfig(max_pending=1, timeout_s=0.5, scheduling="serial"))
    with running_server(service) as url:  # the cached sampler calls the network once per change: 4 x 0.2 s
        slow = {"prompt": "a", "max_tokens": 4, "sampler": "ancestral", "steps": 30}
        results = {}
        t = threading.Thread(target=lambda: results.update(first=post(url, slow)))
        t.start()
        time.sleep(0.2)
        assert_error(post(url, {"prompt": "a", "max_tokens": 2}), 429, "retry")
        t.join()
        assert_error(results["first"], 504, "0.5 s")
        deadline = time.time() + 10
        while service.pending and time.time() < deadline:  # the abandoned work is stopped and released
            time.sleep(0.05)
        assert service.pending == 0
        assert post(url, {"prompt": "a", "max_tokens": 2, "sampler": "ancestral", "steps": 2}).status_code == 200
    service.close()


@pytest.mark.parametrize("body", [b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "guidance": Infinity}',
                                  b'{"prompt": "a", "top_p": -Infinity}', b'{"prompt": "a", "temperature": 1e999}'])
def test_non_finite_numbers_are_refused_as_such(server, body):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 422, "finite number")


def test_extreme_but_valid_values_are_served(server):
    url, _ = server
    for extra in ({"top_k": 10 ** 30}, {"top_p": 5e-324}, {"temperature": 100.0, "guidance": 100.0},
                  {"guidance": -1.0}, {"seed": 2 ** 63 - 1}, {"temperature": 0}, {"tokens_per_step": 5},
                  {"temperature": 5e-324}):  # a vanishing temperature is greedy, not NaN
        r = post(url, {"prompt": "a", "max_tokens": 4, **extra})
        assert r.status_code == 200 and len(r.json()["choices"][0]["tokens"]) == 5, (extra, r.text)


def test_mixed_prompt_lengths_in_the_queue_do_not_wedge_the_worker(checkpoints):
    """Requests of three shapes queue up behind a slow one; the worker sorts them into batches by
    shape (requests are compared by identity, never by their tensors) and answers every one."""
    service = service_for(checkpoints["mdlm"], delay=0.02, batch_window_ms=50, timeout_s=20)
    with running_server(service) as url:
        blocker = threading.Thread(target=post, args=(url, {"prompt": "a", "max_tokens": 8, "sampler": "ancestral",
                                                            "steps": 40}))
        blocker.start()
        time.sleep(0.2)
        bodies = [{"prompt": p, "max_tokens": 16, "sampler": "ancestral", "steps": 8, "seed": i}
                  for i, p in enumerate(["a", "bb", "ccc"] * 4)]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda body: post(url, body), bodies))
        blocker.join()
        assert [r.status_code for r in answers] == [200] * len(bodies), [r.text for r in answers]
        assert [len(r.json()["choices"][0]["tokens"]) for r in answers[:3]] == [17, 18, 19]
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["pending"] == 0 and health["restarts"] == 0
    service.close()


def test_an_error_in_the_worker_loop_fails_no_request_and_the_worker_carries_on(checkpoints):
    service = service_for(checkpoints["mdlm"], timeout_s=5)
    with running_server(service) as url:
        flaky = FlakyQueue(RuntimeError("injected"))
        service.jobs = flaky
        assert wait_until(lambda: flaky.error is None, 5)
        assert post(url, {"prompt": "a", "max_tokens": 3}).status_code == 200
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["restarts"] == 0
    service.close()


def test_a_failing_batch_gets_500_and_the_next_request_succeeds(checkpoints):
    loaded = from_pretrained(checkpoints["mdlm"])
    loaded.model = Failing(loaded.model, RuntimeError("injected failure"))
    service = ModelService(loaded, ServeConfig(timeout_s=5))
    with running_server(service) as url:
        assert_error(post(url, {"prompt": "a", "max_tokens": 3}), 500, "injected failure")
        assert post(url, {"prompt": "a", "max_tokens": 3}).status_code == 200
        assert httpx.get(f"{url}/health").json()["pending"] == 0
    service.close()


def test_a_dead_worker_is_reported_by_health_and_restarted(checkpoints):
    service = service_for(checkpoints["mdlm"], timeout_s=5)
    with running_server(service) as url:
        service.jobs = FlakyQueue(SystemExit("injected"))  # no Exception: it ends the worker thread
        assert wait_until(lambda: not service.worker.is_alive(), 5)
        assert_error(httpx.get(f"{url}/health"), 503, "stopped (SystemExit: injected)")
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["restarts"] == 1
        assert post(url, {"prompt": "a", "max_tokens": 3}).status_code == 200
    service.close()


def test_requests_running_when_the_worker_dies_get_503_at_once_and_later_ones_succeed(checkpoints):
    loaded = from_pretrained(checkpoints["mdlm"])
    loaded.model = Failing(loaded.model, SystemExit("injected"))
    service = ModelService(loaded, ServeConfig(timeout_s=10))
    with running_server(service) as url:
        start = time.monotonic()
        assert_error(post(url, {"prompt": "a", "max_tokens": 3}), 503, "restarted")
        assert time.monotonic() - start < 3
        assert post(url, {"prompt": "a", "max_tokens": 3}).status_code == 200
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["restarts"] == 1 and health["pending"] == 0
    service.close()


@pytest.mark.parametrize("body, words", [
    ({"prompt": "a", "max_tokens": 10 ** 8}, "max_tokens=100000000"),
    ({"prompt": "a [MASK*100000000] b"}, "maximum of 32"),
    ({"prompt": "a [MASK*-3] b"}, "[MASK*n] marker needs a whole number"),
    ({"prompt": "a [MASK*0] b"}, "[MASK*n] marker needs a whole number"),
    ({"prompt": "a " * 400_000}, "leaves no room"),
    ({"prompt": "w1 \ud800 w2"}, "the prompt holds a lone surrogate (U+D800 at character 3)"),
])
def test_oversized_and_malformed_prompts_are_refused_at_once(server, body, words):
    url, _ = server
    start = time.monotonic()
    r = post(url, body)
    assert time.monotonic() - start < 2
    assert_error(r, 400, words)
    assert httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok"


def test_health_answers_while_a_request_is_being_prepared(server, monkeypatch):
    url, service = server
    encode = service.tokenizer.encode

    def slow_encode(*args, **kw):
        time.sleep(1.5)
        return encode(*args, **kw)

    monkeypatch.setattr(service.tokenizer, "encode", slow_encode)
    results = {}
    t = threading.Thread(target=lambda: results.update(r=post(url, {"prompt": "a", "max_tokens": 2})))
    t.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    assert time.monotonic() - start < 0.5
    t.join()
    assert results["r"].status_code == 200


def raw_post(url: str, headers: dict, body=None) -> tuple[int, dict]:
    """POST with exactly the given headers (no body at all unless ``body``); (status, JSON answer)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        if body is None:
            conn.putrequest("POST", "/v1/completions")
            for key, value in headers.items():
                conn.putheader(key, value)
            conn.endheaders()
        else:
            conn.request("POST", "/v1/completions", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_body_over_the_limit_gets_413_before_it_is_read(server):
    url, _ = server
    status, answer = raw_post(url, {"Content-Type": "application/json", "Content-Length": str(2 << 20)})
    assert status == 413 and answer["error"]["type"] == "too_large" and "1048576 bytes" in answer["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_chunked_body_over_the_limit_gets_413(checkpoints):
    service = service_for(checkpoints["mdlm"], max_body_bytes=4096)
    with running_server(service) as url:
        chunks = iter([b'{"prompt": "', b"a" * 3000, b"a" * 3000, b'"}'])
        status, answer = raw_post(url, {"Content-Type": "application/json"}, chunks)  # no length: chunked
        assert status == 413 and set(answer["error"]) == {"type", "message"} and "4096" in answer["error"]["message"]
        status, answer = raw_post(url, {"Content-Type": "application/json"}, iter([b'{"max_tokens": 2}']))
        assert status == 200 and len(answer["choices"][0]["tokens"]) == 2
    service.close()


def test_max_tokens_defaults_to_the_trained_length(tmp_path):
    service = ModelService(from_pretrained(make_checkpoint(tmp_path, overrides=("data.length=16",))))
    with running_server(service) as url:
        assert len(post(url, {"seed": 1}).json()["choices"][0]["tokens"]) == 16
        assert len(post(url, {"prompt": "ab", "seed": 1}).json()["choices"][0]["tokens"]) == 16
        assert len(post(url, {"prompt": "a", "max_tokens": 31}).json()["choices"][0]["tokens"]) == 32
        assert_error(post(url, {"prompt": "a" * 20}), 400, "set max_tokens (at most 12)")
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["default_length"] == 16
    service.close()


def test_a_client_that_gives_up_cancels_its_request(checkpoints):
    service = service_for(checkpoints["mdlm"], delay=0.1, timeout_s=60)
    with running_server(service) as url:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):  # 60 steps of 0.1 s: 6 s of work
            post(url, {"prompt": "a", "max_tokens": 8, "sampler": "ancestral", "steps": 60}, timeout=0.5)
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["pending"] == 0, 10)
        assert time.monotonic() - start < 3
        assert post(url, {"prompt": "a", "max_tokens": 2, "sampler": "ancestral", "steps": 2}).status_code == 200
    service.close()


def test_closing_the_service_answers_running_and_queued_requests_with_503(checkpoints):
    service = service_for(checkpoints["mdlm"], delay=0.1, timeout_s=10, scheduling="serial")
    with running_server(service) as url:
        results = {}
        slow = {"prompt": "a", "max_tokens": 8, "sampler": "ancestral", "steps": 60}
        threads = [threading.Thread(target=lambda k=k: results.update({k: post(url, {**slow, "seed": k})}))
                   for k in range(2)]
        for t in threads:
            t.start()
        assert wait_until(lambda: service.pending == 2, 5)
        start = time.monotonic()
        service.close()
        for t in threads:
            t.join()
        assert time.monotonic() - start < 3
        for k in range(2):
            assert_error(results[k], 503, "shutting down")
        assert_error(httpx.get(f"{url}/health"), 503, "shutting down")
        assert_error(post(url, {"prompt": "a", "max_tokens": 2}), 503, "shutting down")


def test_the_model_id_does_not_reveal_local_paths(server, tmp_path):
    url, _ = server
    info = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert info["id"] == "mdlm" and str(tmp_path.parent) not in json.dumps(info)
    assert post(url, {"prompt": "a", "max_tokens": 2, "model": "mdlm"}).status_code == 200
    hub = Path("/home/me/.cache/huggingface/hub/models--kuleshov-group--mdlm-owt/snapshots/0123abc")
    assert model_name(hub) == "kuleshov-group/mdlm-owt"
    assert model_name(Path("/data/runs/owt-small/checkpoints/step_00001000")) == "owt-small"
    assert model_name(Path("/data/exported/my-model")) == "my-model"
    assert model_name(Path("/data/mdlm.ckpt")) == "mdlm.ckpt"


def test_a_stream_that_is_not_read_holds_at_most_max_stream_lag_canvases(checkpoints):
    service = service_for(checkpoints["mdlm"], max_stream_lag=3)

    async def unread_events():
        req = CompletionRequest(prompt="a", max_tokens=20, sampler="ancestral", steps=30, seed=1, stream=True)
        job, _ = await service.submit(req)
        while not job.finished:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the events the worker sent are delivered
        return [job.events.get_nowait() for _ in range(job.events.qsize())]

    events = asyncio.run(unread_events())
    assert [kind for kind, _ in events] == ["step"] * 3 + ["done"]
    assert [step for _, (step, _) in events[:3]] == [1, 2, 3] and events[-1][1]["steps"] > 10
    service.close()


def test_a_stream_whose_client_stops_reading_is_dropped_at_its_deadline():
    closed = []

    async def events():
        while True:
            yield "data: {}\n\n"

    async def receive():
        await asyncio.sleep(3600)  # the client never disconnects

    async def send(message):
        if message["type"] == "http.response.body":
            await asyncio.sleep(3600)  # ... and never reads

    async def scenario():
        response = EventStream(events(), time.monotonic() + 0.2, lambda: closed.append(True))
        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        await asyncio.wait_for(response(scope, receive, send), 5)

    start = time.monotonic()
    asyncio.run(scenario())
    assert closed == [True] and time.monotonic() - start < 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian package chromium); .ci/run installs it")
def test_the_page_unmasks_the_canvas_in_headless_chromium(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    url, _ = server
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.querySelector('#sampler').options.length > 0")
            page.fill("#prompt", "the king [MASK*10] said")
            page.fill("#seed", "5")
            page.select_option("#sampler", "ancestral")
            page.fill("#steps", "5")
            page.click("#go")
            page.wait_for_function("document.querySelector('#canvases').dataset.done === 'true'", timeout=30000)
            assert page.get_attribute("#canvases", "data-masks") == "0"
            frames = int(page.get_attribute("#canvases", "data-frame"))
            assert frames >= 2
            text = page.inner_text(".canvas")
            assert text.startswith("the king ") and text.endswith(" said")
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            page.click("#play")  # the replay starts from the all-masked canvas
            page.wait_for_function("Number(document.querySelector('#canvases').dataset.masks) === 10")
        finally:
            browser.close()
    assert (tmp_path / "serve.png").stat().st_size > 1000


def test_a_stream_of_a_revising_sampler_sends_its_changes_by_position_and_its_text_once_final(tmp_path):
    """Confidence decoding with remasking takes revealed tokens back: the stream says so position by position
    (``changed``), and sends no text before the end, since an OpenAI client cannot take text back."""
    ckpt = make_checkpoint(tmp_path, "mdlm", ("sample.sampler=confidence", "sample.remask=0.5"))
    service = ModelService(from_pretrained(ckpt))
    with running_server(service) as url:
        body = {"prompt": "to ", "max_tokens": 12, "steps": 8, "seed": 3}
        events = stream_events(url, body)
        plain = post(url, body).json()["choices"][0]
    service.close()
    steps, final = events[1:-2], events[-2]
    assert any(e["choices"][0]["unmask"]["changed"] for e in steps)
    assert all(e["choices"][0]["text"] == "" for e in events[:-2])
    assert final["choices"][0]["text"] == plain["text"] == streamed_text(events)
    assert canvases(events)[-1][0] == plain["tokens"]


def test_the_command_decodes_in_its_main_thread_and_stops_cleanly_on_sigterm(checkpoints):
    """``unmask serve`` answers HTTP from a thread and decodes in its main thread; SIGTERM stops it (exit 0),
    and a second server on a taken port is a one-line error (exit 2)."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "unmask", "serve", str(checkpoints["mdlm"]), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        assert wait_until(healthy, 60) and proc.poll() is None
        assert post(url, {"prompt": "a", "max_tokens": 4, "seed": 1}).status_code == 200
        taken = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 2 and f"could not listen on 127.0.0.1:{port}: Address already in use" in taken.stderr
        assert len(taken.stderr.strip().splitlines()) == 1, taken.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
