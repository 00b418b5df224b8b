"""Likelihood over HTTP: ``echo`` + ``logprobs`` with ``max_tokens`` 0 or 1 returns each prompt token's
log-probability (exact for AR; for diffusion models a telescoping split of the NELBO bound whose suffix sums
are the bound of each continuation, the same numbers as unmask's own lm-eval model), the tokenizer endpoints
lm-eval's remote tokenizer reads, and lm-eval's real ``local-completions`` client scoring a multiple-choice task
against the server with the numbers of ``unmask.eval.lm_eval`` on the same model."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from test_interop import tiny_checkpoint
from test_serve import assert_error, post
from unmask.eval.likelihood import continuation_loglikelihoods
from unmask.pipeline import from_pretrained
from unmask.serve.app import running_server
from unmask.serve.service import ModelService, ServeConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("likelihood")
    return {family: tiny_checkpoint(root, family) for family in ("mdlm", "ar")}


@pytest.fixture(scope="module")
def servers(checkpoints):
    services = {family: ModelService(from_pretrained(ckpt), ServeConfig(max_likelihood_rows=600, mc_samples=8))
                for family, ckpt in checkpoints.items()}
    with running_server(services["mdlm"]) as mdlm, running_server(services["ar"]) as ar:
        yield {"mdlm": (mdlm, services["mdlm"]), "ar": (ar, services["ar"])}
    for service in services.values():
        service.close()


def bos_of(service) -> list[int]:
    return [service.tokenizer.bos_id] if service.bos else []


def test_ar_echo_returns_the_exact_log_probability_of_every_prompt_token(servers):
    url, service = servers["ar"]
    text = "the cat sat"
    out = post(url, {"prompt": text, "echo": True, "logprobs": 2, "max_tokens": 0}).json()
    choice = out["choices"][0]
    ids = service.tokenize(text)
    assert choice["text"] == text and "".join(choice["logprobs"]["tokens"]) == text
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert out["unmask"]["likelihood"] == "exact" and out["unmask"]["mc_samples"] is None
    seq = bos_of(service) + ids
    objective = service.loaded.objective
    x = torch.tensor([seq])
    logits = service.model(objective.inputs(x))[0].double()
    logits[:, objective.mask_id] = float("-inf")
    expected = logits.log_softmax(-1)[range(len(seq)), seq][len(seq) - len(ids):]
    torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"], dtype=torch.float64), expected,
                               atol=1e-5, rtol=0)
    tops = choice["logprobs"]["top_logprobs"]
    assert all(len(top) == 2 and max(top.values()) >= v - 1e-6
               for top, v in zip(tops, choice["logprobs"]["token_logprobs"]))
    suffix = choice["unmask"]["suffix_logprobs"]
    assert suffix[0] == pytest.approx(sum(choice["logprobs"]["token_logprobs"])) and choice["unmask"]["bound"] is False
    nxt = post(url, {"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 1}).json()["choices"][0]
    assert nxt["logprobs"]["token_logprobs"][:-1] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-6)
    last_top = nxt["logprobs"]["top_logprobs"][-1]
    assert nxt["logprobs"]["tokens"][-1] in last_top and nxt["logprobs"]["token_logprobs"][-1] == \
        pytest.approx(max(last_top.values()))


def test_diffusion_echo_splits_the_bound_so_every_suffix_sums_to_its_own_bound(servers):
    url, service = servers["mdlm"]
    prompts = ["to be or", "a cat"]
    out = post(url, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0, "seed": 9,
                     "mc_samples": 6}).json()
    assert out["unmask"]["likelihood"] == "bound" and out["unmask"]["mc_samples"] == 6
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for text, choice in zip(prompts, out["choices"]):
        ids = service.tokenize(text)
        seq, b = bos_of(service) + ids, len(bos_of(service))
        own = continuation_loglikelihoods(service.model, service.loaded.objective, [seq] * len(ids),
                                          [b + k for k in range(len(ids))], 6, seed=9)
        terms = choice["logprobs"]["token_logprobs"]
        for k, (ll, stderr, _) in enumerate(own):
            assert math.fsum(terms[k:]) == pytest.approx(ll, abs=1e-6)
            assert choice["unmask"]["suffix_logprobs"][k] == pytest.approx(ll, abs=1e-9)
            assert choice["unmask"]["suffix_stderr"][k] == pytest.approx(stderr, abs=1e-9)
        assert choice["unmask"]["bound"] is True and all(ll < 0 for ll, _, _ in own)
    as_ids = post(url, {"prompt": [service.tokenize(p) for p in prompts], "echo": True, "logprobs": 1,
                        "max_tokens": 0, "seed": 9, "mc_samples": 6}).json()
    assert [c["logprobs"] for c in as_ids["choices"]] == [c["logprobs"] for c in out["choices"]]


@pytest.mark.parametrize("body, words", [
    ({"prompt": "a", "max_tokens": 0}, "likelihood request"),
    ({"prompt": "a", "echo": True, "max_tokens": 0}, "set echo true and logprobs"),
    ({"prompt": "a", "echo": True, "logprobs": 1, "max_tokens": 2}, "max_tokens 0 or 1"),
    ({"prompt": "a", "echo": True, "logprobs": 1, "stream": True}, "not streamed"),
    ({"prompt": "a", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.7}, "temperature 0"),
    ({"prompt": "a", "echo": True, "logprobs": 1, "sampler": "ancestral"}, "sampling settings"),
    ({"prompt": "a" * 31, "echo": True, "logprobs": 1, "max_tokens": 0, "mc_samples": 64}, "network rows"),
    ({"prompt": "", "echo": True, "logprobs": 1, "max_tokens": 0}, "no token to score"),
    ({"prompt": [], "echo": True, "logprobs": 1, "max_tokens": 0}, "empty list"),
    ({"prompt": [[1, 2], [99999]], "echo": True, "logprobs": 1, "max_tokens": 0}, "token id 99999"),
    ({"prompt": "ABC", "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt"),
    ({"prompt": ["a", "b"], "max_tokens": 2}, "one prompt"),
    ({"prompt": "a" * 32, "echo": True, "logprobs": 1, "max_tokens": 1}, "does not fit"),
])
def test_bad_likelihood_requests_get_a_400_naming_the_problem(servers, body, words):
    url, _ = servers["mdlm"]
    assert_error(post(url, body), 400, words)


def test_the_tokenizer_endpoints_round_trip(servers):
    url, service = servers["mdlm"]
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["model_max_length"] == service.length and info["eos_token"]
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "to be" + info["eos_token"], "add_special_tokens": False}).json()
    assert ids["tokens"][-1] == service.tokenizer.eos_id and ids["count"] == 6
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids["tokens"][:5]}).json() == {"prompt": "to be"}
    assert_error(httpx.post(f"{url}/tokenize", json={"prompt": "ABC"}), 400, "text")
    assert_error(httpx.post(f"{url}/detokenize", json={"tokens": [10 ** 6]}), 400, "vocabulary")
    assert_error(httpx.post(f"{url}/tokenize", json={"prompt": "a", "extra": 1}), 422, "extra")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_lm_eval_local_completions_scores_a_task_against_the_server_as_unmask_lm_eval_does(servers, checkpoints,
                                                                                            tmp_path, family):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models import openai_completions  # noqa: F401  (registers local-completions)
    from lm_eval.tasks import TaskManager

    from test_lm_eval import write_tasks
    from unmask.eval.lm_eval import UnmaskLM

    url, service = servers[family]
    tasks = TaskManager(include_path=str(write_tasks(tmp_path)))
    remote = simple_evaluate(
        model="local-completions", tasks=["unmask_toy_choice"], task_manager=tasks, log_samples=True,
        model_args=f"base_url={url}/v1/completions,model={service.name},tokenizer_backend=remote,num_concurrent=1,"
                   f"max_retries=1,tokenized_requests=True")
    local = simple_evaluate(model=UnmaskLM(str(checkpoints[family]), mc_samples=service.config.mc_samples,
                                                   seed=1234),  # lm-eval's client sends seed 1234
                                    tasks=["unmask_toy_choice"], task_manager=tasks, log_samples=True)

    def scores(out):
        return [[ll for ll, _ in s["resps"][i]] for s in out["samples"]["unmask_toy_choice"]
                for i in range(len(s["resps"]))]

    assert remote["results"]["unmask_toy_choice"]["acc,none"] == local["results"]["unmask_toy_choice"]["acc,none"]
    for a, b in zip(scores(remote), scores(local), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
