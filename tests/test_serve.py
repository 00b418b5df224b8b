"""The HTTP server, exercised over real loopback HTTP: completions, streams whose last canvas equals
the non-streaming result, infilling, request validation (4xx with a message, server healthy after),
batching that does not change results, limits and timeouts, and the web page in headless Chromium."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from unmask.checkpoint import save_checkpoint  # noqa: E402
from unmask.config import load_config  # noqa: E402
from unmask.pretrained import from_pretrained  # noqa: E402
from unmask.runtime import build_model  # noqa: E402
from unmask.serve import ModelService, ServeConfig, running_server  # noqa: E402
from unmask.tokenization import build_tokenizer  # noqa: E402

from toys import TINY  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


def make_checkpoint(root: Path, family: str = "mdlm") -> Path:
    cfg = load_config(None, TINY + [f"family={family}", f"run_dir={root / family}", "data.tokenizer=char",
                                    "data.frame=false", f"data.alphabet={json.dumps(ALPHABET)}"])
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
        self.time_conditioning = False

    def forward(self, *args, **kw):
        time.sleep(self.delay)
        return self.inner(*args, **kw)


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


def post(url, body, **kw):
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


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
    page = httpx.get(url)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/completions" in page.text


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
    assert final["object"] == "text_completion.final"
    assert [e["step"] for e in chunks] == list(range(len(chunks))) and len(chunks) >= 2
    masks = [sum(t is None for t in e["choices"][0]["tokens"]) for e in chunks]
    assert masks[0] == 10 and masks == sorted(masks, reverse=True)
    assert all(len(e["choices"]) == 2 and len(e["choices"][1]["tokens"]) == 14 for e in chunks)
    assert [c["tokens"] for c in chunks[-1]["choices"]] == [c["tokens"] for c in final["choices"]]
    plain = post(url, body).json()
    assert [c["text"] for c in plain["choices"]] == [c["text"] for c in final["choices"]]
    assert [c["tokens"] for c in plain["choices"]] == [c["tokens"] for c in final["choices"]]


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
    ({"prompt": "a", "max_tokens": 0}, 422, "max_tokens"),
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
])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_stays_healthy(server, body, status, words):
    url, _ = server
    r = post(url, body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert post(url, {"prompt": "a", "max_tokens": 3, "seed": 1}).status_code == 200


def test_malformed_json_and_wrong_method(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert httpx.get(f"{url}/v1/completions").status_code == 405
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
        masks = [sum(t is None for t in e["choices"][0]["tokens"]) for e in events[:-2]]
        assert masks == [5, 4, 3, 2, 1, 0]
        assert post(url, {"prompt": "a[MASK]b"}).status_code == 400
        assert post(url, {"prompt": "a", "guidance": 1.0}).status_code == 400
    service.close()


def test_limits_busy_and_timeout(checkpoints):
    loaded = from_pretrained(checkpoints["mdlm"])
    loaded.model = Slow(loaded.model, 0.05)
    service = ModelService(loaded, ServeConfig(max_pending=1, timeout_s=0.5, batching=False))
    with running_server(service) as url:
        slow = {"prompt": "a", "max_tokens": 4, "sampler": "ancestral", "steps": 30}
        results = {}
        t = threading.Thread(target=lambda: results.update(first=post(url, slow)))
        t.start()
        time.sleep(0.2)
        busy = post(url, {"prompt": "a", "max_tokens": 2})
        assert busy.status_code == 429 and "retry" in busy.json()["error"]["message"]
        t.join()
        assert results["first"].status_code == 504 and "0.5 s" in results["first"].json()["error"]["message"]
        deadline = time.time() + 10
        while service.pending and time.time() < deadline:  # the abandoned work is stopped and released
            time.sleep(0.05)
        assert service.pending == 0
        assert post(url, {"prompt": "a", "max_tokens": 2, "sampler": "ancestral", "steps": 2}).status_code == 200
    service.close()


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
