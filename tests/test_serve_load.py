"""A bounded load test over loopback: a few hundred requests from 16 concurrent clients, with prompts
of mixed lengths, several samples per request for some, streamed or not, and clients that give up
(streams closed early, short timeouts). No 5xx, a truthful and responsive /health throughout, no
wedged worker afterwards, and bounded memory."""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_serve import make_checkpoint  # noqa: E402
from unmask.pipeline import from_pretrained
from unmask.serve.app import running_server
from unmask.serve.service import ModelService, ServeConfig

REQUESTS, CONCURRENCY = 240, 16
PROMPTS = ["", "a", "to ", "the king ", "and so, ", "we are such stuff as dreams ", "to be, [MASK*6] not",
           "[MASK] and [MASK*3]."]


def rss_bytes() -> int:
    """Resident memory of this process (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plan(rng: random.Random, i: int) -> tuple[dict, str]:
    """The body of request ``i`` and what its client does: ``read``, ``close`` a stream after its first
    event, or ``timeout`` quickly."""
    body = {"prompt": rng.choice(PROMPTS), "seed": i, "n": rng.choice([1, 1, 1, 2, 3]),
            "sampler": rng.choice(["first_hitting", "ancestral", "confidence"]), "steps": rng.randint(1, 8)}
    if "[MASK" not in body["prompt"]:
        body["max_tokens"] = rng.randint(1, min(16, 32 - len(body["prompt"])))  # the model's length is 32
    body["stream"] = rng.random() < 0.4
    behaviour = rng.choices(["read", "close", "timeout"], [0.8, 0.1, 0.1])[0]
    if behaviour == "close" and not body["stream"]:
        behaviour = "timeout"
    return body, behaviour


async def storm(url: str) -> dict:
    rng = random.Random(0)
    gate = asyncio.Semaphore(CONCURRENCY)
    statuses: list[int] = []
    health: list[tuple[int, float]] = []
    done = asyncio.Event()

    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=2 * CONCURRENCY)) as client:
        async def one(i: int) -> None:
            body, behaviour = plan(rng, i)
            async with gate:
                try:
                    timeout = 0.02 if behaviour == "timeout" else 60
                    if body["stream"]:
                        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
                            statuses.append(r.status_code)
                            async for chunk in r.aiter_text():
                                if behaviour == "close":
                                    break
                                assert r.status_code != 200 or '"error"' not in chunk, chunk
                    else:
                        r = await client.post("/v1/completions", json=body, timeout=timeout)
                        statuses.append(r.status_code)
                except httpx.TimeoutException:
                    assert behaviour == "timeout"

        async def watch() -> None:
            while not done.is_set():
                start = time.monotonic()
                r = await client.get("/health")
                health.append((r.status_code, time.monotonic() - start))
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        start = time.monotonic()
        try:
            await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        finally:
            seconds = time.monotonic() - start
            done.set()
            await watcher
    return {"statuses": statuses, "health": health, "seconds": seconds}


def test_a_storm_of_mixed_requests_leaves_the_server_healthy(tmp_path):
    torch.set_num_threads(1)  # a tiny model on a small machine: more threads only contend (conftest restores it)
    service = ModelService(from_pretrained(make_checkpoint(tmp_path)),
                           ServeConfig(max_n=3, max_steps=64, timeout_s=30, max_pending=64))
    with running_server(service) as url:
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 4}).status_code == 200
        before = rss_bytes()
        result = asyncio.run(storm(url))
        statuses = result["statuses"]
        assert not [s for s in statuses if s >= 500], statuses
        assert statuses.count(200) >= 0.8 * REQUESTS and set(statuses) <= {200, 429}
        assert result["health"] and all(status == 200 for status, _ in result["health"])
        assert max(seconds for _, seconds in result["health"]) < 2
        start = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the ", "max_tokens": 8, "n": 2}, timeout=10)
        assert r.status_code == 200 and time.monotonic() - start < 5
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{url}/health").json())["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["status"] == "ok" and health["pending"] == 0 and health["restarts"] == 0
        # every 200 went through the queue (and the two single requests); a 429 or a client that timed out
        # before its request was queued is not counted, so REQUESTS itself is not a bound
        assert service.worker.is_alive() and health["requests"] >= statuses.count(200) + 2
        assert rss_bytes() - before < 300 * 2 ** 20
    service.close()
