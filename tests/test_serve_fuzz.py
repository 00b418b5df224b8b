"""Property-based fuzzing of the HTTP schema against the real server: random JSON bodies (the real
fields with values of any type and size, unknown fields, non-object JSON, bytes that are no JSON)
get either a 200 with a result or a 4xx with the documented error object, never a 5xx, and the
server stays healthy."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_serve import ALPHABET, make_checkpoint  # noqa: E402
from unmask.pipeline import from_pretrained
from unmask.serve.app import running_server
from unmask.serve.service import ModelService, ServeConfig

FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "sampler", "steps", "tokens_per_step",
          "guidance", "seed", "n", "stream"]
HUGE = [0, -1, 1, 2, 31, 32, 33, 2 ** 31, 2 ** 63 - 1, 2 ** 63, -2 ** 63, 10 ** 30, -10 ** 30, 10 ** 300]
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-300, 5e-324, 1e300]))
MARKERS = st.sampled_from(["[MASK]", "[MASK*3]", "[MASK*0]", "[MASK*-3]", "[MASK*x]", "[MASK*99999999999]",
                           "[MASK*", "[MASK*100000000]", "[", "]"])
TEXT = st.one_of(st.text(max_size=40),
                 st.lists(st.one_of(st.text(alphabet=ALPHABET, max_size=8), MARKERS), max_size=6).map("".join),
                 st.integers(0, 200_000).map(lambda k: "a" * k))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE), FLOATS, TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
VALID = {  # values that pass validation, so that results and the limits are exercised too
    "model": st.sampled_from(["mdlm", ""]),
    "prompt": st.lists(st.one_of(st.text(alphabet=ALPHABET, max_size=6), st.sampled_from(["[MASK]", "[MASK*3]"])),
                       max_size=3).map("".join),
    "max_tokens": st.integers(1, 12),
    "temperature": st.one_of(st.just(0.0), st.floats(0.05, 3)),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 100),
    "sampler": st.sampled_from(["ancestral", "first_hitting", "confidence"]),
    "steps": st.integers(1, 8),
    "tokens_per_step": st.integers(1, 3),
    "guidance": st.floats(-1, 3),
    "seed": st.integers(0, 2 ** 63 - 1),
    "n": st.integers(1, 2),
    "stream": st.booleans(),
}
WILD = {  # values near and past every limit, and of every type
    "model": st.one_of(st.just("other"), JSON),
    "prompt": st.one_of(TEXT, JSON),
    "max_tokens": st.one_of(st.integers(-2, 40), st.sampled_from(HUGE), JSON),
    "temperature": st.one_of(FLOATS, JSON),
    "top_p": st.one_of(FLOATS, JSON),
    "top_k": st.one_of(st.sampled_from(HUGE), JSON),
    "sampler": st.one_of(st.sampled_from(["ar", "magic", "ANCESTRAL"]), JSON),
    "steps": st.one_of(st.integers(-1, 40), st.sampled_from(HUGE), JSON),
    "tokens_per_step": st.one_of(st.integers(0, 40), st.sampled_from(HUGE), JSON),
    "guidance": st.one_of(FLOATS, JSON),
    "seed": st.one_of(st.integers(-5, 2 ** 64), st.sampled_from(HUGE), JSON),
    "n": st.one_of(st.integers(-1, 4), st.sampled_from(HUGE), JSON),
    "stream": st.one_of(st.sampled_from(["yes", "true", 1, 0, None]), JSON),
}
VALID_OBJECTS = st.fixed_dictionaries({}, optional=VALID)
MUTATED_OBJECTS = st.tuples(VALID_OBJECTS, st.fixed_dictionaries({}, optional=WILD),
                            st.dictionaries(st.text(max_size=10), JSON, max_size=2)).map(
    lambda parts: {**parts[2], **parts[0], **parts[1]})
BODIES = st.one_of(VALID_OBJECTS.map(lambda b: json.dumps(b).encode()),
                   MUTATED_OBJECTS.map(lambda b: json.dumps(b).encode()),
                   JSON.map(lambda b: json.dumps(b).encode()),
                   st.binary(max_size=64),
                   st.sampled_from([b"", b"{", b"[" * 50_000, b'{"prompt": "\\ud800"}', b'{"\\ud800": 1}',
                                    b'{"n": 1e999}', b'{"max_tokens": ' + b"9" * 5000 + b"}",
                                    b'{"prompt": "a", "prompt": 5}']))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("fuzz"))
    service = ModelService(from_pretrained(checkpoint), ServeConfig(max_n=2, max_steps=64, timeout_s=30))
    with running_server(service) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, service
    service.close()


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=BODIES)
def test_every_body_gets_a_result_or_a_documented_4xx(server, body):
    client, _ = server
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (body[:200], r.status_code, r.text[:300])
    if r.status_code != 200:
        error = r.json()
        assert set(error) == {"error"} and set(error["error"]) == {"type", "message"}, error
        assert "\n" not in error["error"]["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text[-300:]
    else:
        assert r.json()["choices"] and all(choice["tokens"] for choice in r.json()["choices"])


def test_the_server_is_healthy_after_the_fuzzing(server):
    client, service = server
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["restarts"] == 0
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    assert service.pending == 0
