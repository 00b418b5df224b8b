"""Step-level continuous batching in ``unmask serve``: a seeded request gives the same tokens alone and under a
random concurrent load (mixed samplers, lengths, n, streams, requests joining while others run), short requests
are not held back by a long one, and caches are counted against a byte budget (429 with Retry-After when full,
400 for a request that can never fit)."""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time

import httpx
import pytest

from test_serve import Slow, assert_error, make_checkpoint, post, stream_events, wait_until
from unmask.pipeline import from_pretrained
from unmask.serve.app import running_server
from unmask.serve.service import ModelService, ServeConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_steps")
    return {"mdlm": make_checkpoint(root, "mdlm"), "ar": make_checkpoint(root, "ar")}


def test_a_seeded_request_gives_the_same_tokens_alone_and_under_a_random_concurrent_load(checkpoints):
    service = ModelService(from_pretrained(checkpoints["mdlm"]), ServeConfig(max_n=4, max_batch_rows=64))
    probe = {"prompt": "the king ", "max_tokens": 12, "seed": 1234, "sampler": "confidence", "steps": 6, "n": 2}
    rng = random.Random(0)
    samplers = [("ancestral", {"steps": 5}), ("first_hitting", {"tokens_per_step": 2}), ("confidence", {"steps": 4}),
                ("llada", {"steps": 8}), ("dream", {"steps": 6})]
    load = []
    for i in range(24):
        name, extra = rng.choice(samplers)
        load.append({"prompt": "abcdefgh"[:rng.randint(1, 8)], "max_tokens": rng.randint(2, 20), "seed": i,
                     "sampler": name, "n": rng.randint(1, 3), "stream": rng.random() < 0.3, **extra})
    with running_server(service) as url:
        alone = post(url, probe).json()
        assert alone["unmask"]["batched_with"] == 0

        def send(body):
            if body["stream"]:
                return stream_events(url, body)[-2]
            return post(url, body).json()

        with concurrent.futures.ThreadPoolExecutor(len(load) + 1) as pool:  # no request waits for a thread
            futures = [pool.submit(send, body) for body in load[:12]]
            assert wait_until(lambda: len(service.current) >= 2, 30)  # being decoded, whatever the machine's speed
            probed = pool.submit(post, url, probe)  # joins while others run ...
            futures += [pool.submit(send, body) for body in load[12:]]  # ... and others join while it runs
            under_load = probed.result().json()
            answers = [f.result() for f in futures]
    service.close()
    assert under_load["unmask"]["batched_with"] >= 1
    assert [c["tokens"] for c in under_load["choices"]] == [c["tokens"] for c in alone["choices"]]
    assert all(len(a["choices"]) >= 1 for a in answers)
    assert service.stats["largest_batch"] >= 3


def test_short_requests_are_not_held_back_by_a_long_one(checkpoints):
    """A request of 28 steps runs; short requests (3 steps) that arrive after it join it step by step and
    finish while it still runs, each within a bound of its own steps (not the long one's)."""
    loaded = from_pretrained(checkpoints["mdlm"])
    loaded.model = Slow(loaded.model, 0.05)
    service = ModelService(loaded, ServeConfig(timeout_s=60))
    long = {"prompt": "a", "max_tokens": 28, "sampler": "first_hitting", "seed": 1}
    with running_server(service) as url:
        done = {}
        thread = threading.Thread(target=lambda: done.update(long=post(url, long)))
        thread.start()
        assert wait_until(lambda: service.stats["steps"] >= 3, 10)

        def short(k):
            start = time.monotonic()
            r = post(url, {"prompt": "b", "max_tokens": 3, "sampler": "first_hitting", "seed": k})
            return r, time.monotonic() - start, "long" in done

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            shorts = list(pool.map(short, range(3)))
        thread.join()
        assert done["long"].status_code == 200 and done["long"].json()["unmask"]["batched_with"] >= 1
    service.close()
    for r, seconds, long_done in shorts:
        assert r.status_code == 200 and r.json()["unmask"]["batched_with"] >= 1 and not long_done
        # 3 steps of 0.05 s and the step it waited for to join: far below the long request's 1.4 s
        assert seconds < 0.8, seconds


class Delayed(Slow):
    """:class:`Slow`, passing the inner network's attributes (its caches) through."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_caches_are_counted_against_the_budget(checkpoints):
    loaded = from_pretrained(checkpoints["ar"])
    loaded.model = Delayed(loaded.model, 0.05)
    service = ModelService(loaded, ServeConfig(timeout_s=30))
    body = {"prompt": "a", "max_tokens": 8, "seed": 3}
    with running_server(service) as url:
        first = {}
        thread = threading.Thread(target=lambda: first.update(r=post(url, body)))
        thread.start()
        assert wait_until(lambda: service.reserved > 0, 5)
        per_request = service.reserved  # the keys and values of every position of its row, every layer
        service.config.cache_budget_bytes = per_request
        refused = post(url, {**body, "seed": 4})
        assert_error(refused, 429, "cache budget is full")
        assert int(refused.headers["retry-after"]) >= 1
        assert_error(post(url, {**body, "n": 2}), 400, "cache budget is")  # could never fit
        assert wait_until(lambda: service.metrics.cache_bytes._value.get() > 0, 5)
        measured = service.metrics.cache_bytes._value.get()
        thread.join()
        assert first["r"].status_code == 200 and service.reserved == 0
        assert post(url, {**body, "seed": 5}).status_code == 200  # the budget is free again
        metrics = httpx.get(f"{url}/metrics").text
    service.close()
    canvas = len(first["r"].json()["choices"][0]["tokens"])
    assert per_request == service.position_bytes * canvas
    assert measured == per_request  # a KV cache of the canvas' capacity: the reservation is what it holds
    assert "unmask_cache_reserved_bytes 0.0" in metrics


@pytest.mark.parametrize("family", ["ar", "bd3lm"])
def test_requests_that_share_a_prompt_prefix_reuse_its_keys_and_values(checkpoints, tmp_path, family):
    """A prompt that starts like an earlier one takes the stored blocks of that prefix instead of computing them
    (16 tokens for an AR model, the model's blocks for block diffusion): counted in /health and /metrics, and
    the tokens are those of a server without the cache."""
    checkpoint = checkpoints["ar"] if family == "ar" else make_checkpoint(tmp_path, family, ("model.block_size=4",))
    system = "to be or not to be, "
    bodies = [{"prompt": system + tail, "max_tokens": 4, "seed": i} for i, tail in enumerate(["a", "bb", "a"])]
    answers = {}
    for budget in (0, 1 << 20):
        service = ModelService(from_pretrained(checkpoint), ServeConfig(prefix_cache_bytes=budget))
        with running_server(service) as url:
            answers[budget] = [post(url, body).json()["choices"][0]["tokens"] for body in bodies]
            health = httpx.get(f"{url}/health").json()
            metrics = httpx.get(f"{url}/metrics").text
        service.close()
    assert answers[0] == answers[1 << 20]
    reused = health["prefix_tokens_reused"]
    assert f"unmask_prefix_tokens_reused {float(reused)}" in metrics
    if family == "ar":
        # the model's 32 positions: BOS and 20 characters of shared prompt, one block of 16 reused by the second
        # and the third request
        assert reused == 2 * 16
    else:  # the whole blocks of the shared prompt before the first decoded block, by the second and third
        block = service.run.model.block_size
        shared = (len(system) + int(service.bos)) // block * block
        assert reused >= 2 * shared > 0
