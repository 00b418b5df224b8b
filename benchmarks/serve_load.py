"""A bounded load test of ``unmask serve`` over loopback: step-level continuous batching against request-level
batching, side by side in one run, on one mixed workload.

The workload is a fixed list of completion requests (seeded): prompts of mixed lengths (cut from the model's
own corpus text) and mixed ``max_tokens``, each with its own seed, steps in proportion to its tokens. For each
concurrency level and each scheduling (``--scheduling step`` and ``request``, in turn, each in a server
process of its own on a free loopback port), the clients send the requests (asyncio + httpx, ``concurrency``
at a time) and the script records generated tokens/s, requests/s, p50/p99 latency and, for a second pass of
the same requests streamed, the time to the first streamed token (the first event that reveals one) p50/p99.
Before the servers start it times the same first requests sampled directly in this process (the sampler
``unmask sample`` runs, no server), so the step engine's overhead at concurrency 1 is measured too.

    python benchmarks/serve_load.py --model runs/quickstart --tag quickstart
    python benchmarks/serve_load.py --smoke          # seconds: the test suite runs this

With ``--shared-prefix MODEL`` (a causal model) it also runs a shared-system-prompt load: every prompt starts
with the same text (half the trained length) and ends differently; the step server with its prefix cache
against one without (``--prefix-cache-bytes 0``), side by side: the prompt tokens not recomputed (the cache's
counts in ``/health``), and the throughput gain.

Writes ``benchmarks/results/serve-<tag>.json`` (one record per concurrency level with ``concurrency`` and
``throughput_vs_request_batching``; ``shared_prefix``) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from unmask.pipeline import from_pretrained  # noqa: E402
from unmask.serve.service import CompletionRequest, ModelService  # noqa: E402

from common import run_header, smoke_run  # noqa: E402

SCHEDULINGS = ("step", "request")
TEXT = ("ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun. Arise, "
        "fair sun, and kill the envious moon, who is already sick and pale with grief.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(requests: int, max_length: int, sampler: str, tokens_per_step: float, seed: int = 0) -> list[dict]:
    """The requests: prompt lengths uniform in [0, max_length / 4], max_tokens in [max_length / 8, max_length / 2]
    (``max_length``: the length the model was trained on)."""
    rng = random.Random(seed)
    bodies = []
    for i in range(requests):
        prompt = TEXT[:rng.randint(0, max_length // 4)]
        new = rng.randint(max(1, max_length // 8), max_length // 2)
        bodies.append({"prompt": prompt, "max_tokens": new, "sampler": sampler, "seed": i,
                       "steps": max(1, round(new / tokens_per_step))})
    return bodies


def shared_prefix_workload(requests: int, max_length: int, seed: int = 0) -> list[dict]:
    """Prompts of one system text (``max_length / 2``) and a varied tail of up to 8 characters, then
    ``max_length / 8`` new tokens."""
    rng = random.Random(seed)
    head = TEXT[:max_length // 2]
    return [{"prompt": head + TEXT[rng.randint(0, 80):][:rng.randint(1, 8)], "max_tokens": max_length // 8,
             "seed": i} for i in range(requests)]


def start_server(model: str, scheduling: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "unmask", "serve", model, "--port", str(port), "--scheduling", scheduling, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return proc, f"http://127.0.0.1:{port}"


def wait_until_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the server did not answer /health within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def load(url: str, bodies: list[dict], concurrency: int, stream: bool) -> dict:
    """Send ``bodies`` from ``concurrency`` clients; throughput, latencies and (streamed) times to first token."""
    latencies, first_tokens = [], []
    tokens = failures = 0
    gate = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(timeout=600) as client:
        async def one(body: dict) -> None:
            nonlocal tokens, failures
            async with gate:
                start = time.perf_counter()
                if not stream:
                    r = await client.post(f"{url}/v1/completions", json=body)
                    latencies.append(time.perf_counter() - start)
                    if r.status_code != 200:
                        failures += 1
                        return
                    tokens += r.json()["usage"]["completion_tokens"]
                    return
                first = None
                async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                    if r.status_code != 200:
                        failures += 1
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[len("data: "):])
                        if first is None and any(c["unmask"].get("revealed") for c in event["choices"]):
                            first = time.perf_counter() - start
                            first_tokens.append(first)
                        if event.get("unmask", {}).get("final"):
                            tokens += event["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - start)

        await client.post(f"{url}/v1/completions", json={**bodies[0], "seed": 10 ** 6})  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
        wall = time.perf_counter() - start
        health = (await client.get(f"{url}/health")).json()
    record = {"requests": len(bodies), "failures": failures, "wall_seconds": wall,
              "requests_per_second": len(bodies) / wall, "generated_tokens_per_second": tokens / wall,
              "p50_seconds": statistics.median(latencies), "p99_seconds": percentile(latencies, 0.99),
              "mean_seconds": statistics.fmean(latencies), "largest_batch": health["largest_batch"]}
    if stream:
        record.update(ttft_p50_seconds=statistics.median(first_tokens), ttft_p99_seconds=percentile(first_tokens, 0.99))
    return record


def direct_seconds(model: str, bodies: list[dict]) -> list[float]:
    """Seconds each request takes sampled without a server (the sampler ``unmask sample`` runs on the request's
    canvas and seeds), after one warm-up, in this process (whose OpenMP waits as the servers' do: OpenMP's
    default unless the environment says otherwise)."""
    service = ModelService(from_pretrained(model))
    try:
        prepared = [service.prepare(CompletionRequest(**body)) for body in [bodies[0], *bodies]]
        seconds = []
        for canvas, seeds, _, sampler, _ in prepared:
            start = time.perf_counter()
            sampler.sample(service.model, canvas, seeds)
            seconds.append(time.perf_counter() - start)
        return seconds[1:]
    finally:
        service.close()


def serve_load(args, out_dir: Path) -> dict:
    config = from_pretrained(args.model).config
    length = min(config.data.length, config.model.length)  # the length it was trained on: the server's default
    bodies = workload(args.requests, length, args.sampler, args.tokens_per_step)
    levels = [int(c) for c in args.concurrency.split(",")]
    single = bodies[:args.single_requests]
    direct = direct_seconds(args.model, single) if 1 in levels else None
    records = []
    with contextlib.ExitStack() as started:  # every server started is stopped, whatever happens
        servers = {}
        for scheduling in SCHEDULINGS:
            proc, url = start_server(args.model, scheduling, args.server_args.split())
            started.callback(stop_server, proc)
            servers[scheduling] = (proc, url)
        for proc, url in servers.values():
            wait_until_healthy(proc, url)
        for concurrency in levels:
            asked = single if concurrency == 1 else bodies
            record = {"concurrency": concurrency, "modes": {}}
            for scheduling, (_, url) in servers.items():  # side by side: the same requests, one after the other
                record["modes"][scheduling] = asyncio.run(load(url, asked, concurrency, stream=False))
            if concurrency > 1:
                for scheduling, (_, url) in servers.items():
                    streamed = asyncio.run(load(url, asked, concurrency, stream=True))
                    record["modes"][scheduling]["streamed"] = streamed
            step, request = record["modes"]["step"], record["modes"]["request"]
            record["throughput_vs_request_batching"] = \
                step["generated_tokens_per_second"] / request["generated_tokens_per_second"]
            record["p99_latency_vs_request_batching"] = step["p99_seconds"] / request["p99_seconds"]
            if concurrency > 1:
                record["ttft_p50_vs_request_batching"] = \
                    step["streamed"]["ttft_p50_seconds"] / request["streamed"]["ttft_p50_seconds"]
            if concurrency == 1 and direct:
                record["direct_mean_seconds"] = statistics.fmean(direct)
                record["step_overhead_vs_direct_sampling"] = step["mean_seconds"] / statistics.fmean(direct) - 1
            records.append(record)
    if args.shared_prefix:
        records.append(shared_prefix(args))
    result = {**run_header(args.tag, ceilings=not args.smoke), "model": args.model,
              "workload": {"requests": args.requests, "single_requests": args.single_requests, "length": length,
                           "sampler": args.sampler, "tokens_per_step": args.tokens_per_step,
                           "server_args": args.server_args},
              "levels": records}
    out = out_dir / f"serve-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)
    return result


def shared_prefix(args) -> dict:
    """The shared-system-prompt load on the causal model ``args.shared_prefix``: the step server with and
    without its prefix cache, side by side."""
    config = from_pretrained(args.shared_prefix).config
    length = min(config.data.length, config.model.length)
    bodies = shared_prefix_workload(args.requests, length)
    concurrency = max(int(c) for c in args.concurrency.split(","))
    record = {"shared_prefix": args.shared_prefix, "concurrency": concurrency, "length": length, "modes": {}}
    with contextlib.ExitStack() as started:
        servers = {}
        for name, budget in (("prefix cache", str(1 << 28)), ("no prefix cache", "0")):
            proc, url = start_server(args.shared_prefix, "step", ["--prefix-cache-bytes", budget])
            started.callback(stop_server, proc)
            servers[name] = (proc, url)
        for name, (proc, url) in servers.items():
            wait_until_healthy(proc, url)
            before = httpx.get(f"{url}/health").json()
            run = asyncio.run(load(url, bodies, concurrency, stream=False))
            after = httpx.get(f"{url}/health").json()
            if "prefix_tokens_reused" in after:
                reused = after["prefix_tokens_reused"] - before["prefix_tokens_reused"]
                computed = after["prefix_tokens_computed"] - before["prefix_tokens_computed"]
                run.update(prompt_tokens_reused=reused, prompt_tokens_computed=computed,
                           prefix_hit_rate=reused / max(1, reused + computed))
            record["modes"][name] = run
    record["throughput_vs_no_prefix_cache"] = (record["modes"]["prefix cache"]["generated_tokens_per_second"]
                                               / record["modes"]["no prefix cache"]["generated_tokens_per_second"])
    return record


def print_table(result: dict) -> None:
    print(f"{result['date']} {result['machine']['cpu']} ({result['machine']['cores']} cores), commit "
          f"{result['commit']}; {json.dumps(result['workload'])}")
    print("| concurrency | scheduling | tokens/s | requests/s | p50 (s) | p99 (s) | TTFT p50 (s) | TTFT p99 (s) | "
          "largest step/batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for level in result["levels"]:
        if "shared_prefix" in level:
            cached = level["modes"]["prefix cache"]
            print(f"shared prefix ({level['shared_prefix']}, concurrency {level['concurrency']}): "
                  f"{cached['generated_tokens_per_second']:.0f} against "
                  f"{level['modes']['no prefix cache']['generated_tokens_per_second']:.0f} tokens/s "
                  f"({level['throughput_vs_no_prefix_cache']:.2f}x); prompt tokens reused "
                  f"{cached['prompt_tokens_reused']}, computed {cached['prompt_tokens_computed']} (hit rate "
                  f"{100 * cached['prefix_hit_rate']:.0f} %)")
            continue
        for scheduling, r in level["modes"].items():
            s = r.get("streamed", {})
            ttft = (f"{s['ttft_p50_seconds']:.3f} | {s['ttft_p99_seconds']:.3f}" if s else "- | -")
            print(f"| {level['concurrency']} | {scheduling} | {r['generated_tokens_per_second']:.0f} | "
                  f"{r['requests_per_second']:.2f} | {r['p50_seconds']:.3f} | {r['p99_seconds']:.3f} | {ttft} | "
                  f"{r['largest_batch']} |")
        extra = f", TTFT p50 {level['ttft_p50_vs_request_batching']:.2f}x" if "ttft_p50_vs_request_batching" in level \
            else ""
        if "step_overhead_vs_direct_sampling" in level:
            extra += f", step engine vs direct sampling {100 * level['step_overhead_vs_direct_sampling']:+.1f}%"
        print(f"concurrency {level['concurrency']}: step/request throughput "
              f"{level['throughput_vs_request_batching']:.2f}x, p99 latency "
              f"{level['p99_latency_vs_request_batching']:.2f}x{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--tag")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level above 1")
    parser.add_argument("--single-requests", type=int, default=16, help="requests at concurrency 1")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument("--sampler", default="confidence")
    parser.add_argument("--tokens-per-step", type=float, default=2.0, help="steps = max_tokens / this")
    parser.add_argument("--server-args", default="", help="extra arguments for `unmask serve`")
    parser.add_argument("--shared-prefix", help="a causal model: also run the shared-system-prompt load on it")
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny shape; nothing is recorded")
    args = parser.parse_args()
    missing = [f"--{name}" for name in ("model", "tag") if getattr(args, name) is None]
    if missing and not args.smoke:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if not args.smoke:
        serve_load(args, ROOT / "benchmarks" / "results")
        return
    with tempfile.TemporaryDirectory() as tmp:  # a two-step model; the record goes there too
        args.model, args.tag = str(smoke_run(Path(tmp), "mdlm")), "smoke"
        args.shared_prefix = str(smoke_run(Path(tmp), "ar"))
        args.requests, args.single_requests, args.concurrency = 6, 2, "1,3"
        serve_load(args, Path(tmp))


if __name__ == "__main__":
    main()
