"""A bounded load test of ``unmask serve`` over loopback: throughput and latency with and without
request batching, side by side in one run.

For each mode the script starts ``unmask serve MODEL`` in its own process on a free loopback port,
waits for ``/health``, sends a fixed number of completion requests from ``--concurrency`` concurrent
clients (asyncio + httpx, each request with its own seed), stops the server and reports requests/s,
generated tokens/s and the p50/p99 latency. Nothing runs longer than the fixed request count.

    python benchmarks/serve_load.py --model runs/quickstart --tag quickstart
    python benchmarks/serve_load.py --smoke          # seconds: the test suite runs this

Writes ``benchmarks/results/serve_load-<tag>.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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
from common import run_header, smoke_run  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, batching: bool, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "unmask", "serve", model, "--port", str(port), *extra]
    cmd += ["--scheduling", "request" if batching else "serial"]
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


async def load(url: str, body: dict, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    tokens = 0
    failures = 0
    gate = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            nonlocal tokens, failures
            async with gate:
                start = time.perf_counter()
                r = await client.post(f"{url}/v1/completions", json={**body, "seed": i})
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    failures += 1
                    return
                tokens += r.json()["usage"]["completion_tokens"]

        await client.post(f"{url}/v1/completions", json={**body, "seed": 10 ** 6})  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
        health = (await client.get(f"{url}/health")).json()
    latencies.sort()
    return {"requests": requests, "failures": failures, "wall_seconds": wall, "requests_per_second": requests / wall,
            "generated_tokens_per_second": tokens / wall, "p50_seconds": statistics.median(latencies),
            "p99_seconds": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "mean_seconds": statistics.fmean(latencies), "batches": health["batches"] - 1,
            "largest_batch": health["largest_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--tag")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sampler", default="first_hitting")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per request (default: the server's, the length the model was trained on)")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--server-args", default="", help="extra arguments for `unmask serve`")
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
        args.requests, args.concurrency, args.max_tokens = 4, 2, 8
        serve_load(args, Path(tmp))


def serve_load(args, out_dir: Path) -> None:
    body = {"prompt": args.prompt, "sampler": args.sampler}
    if args.steps:
        body["steps"] = args.steps
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    results = {}
    with contextlib.ExitStack() as started:  # every server started is stopped, whatever happens

        def start(batching: bool) -> tuple[subprocess.Popen, str]:
            proc, url = start_server(args.model, batching, args.server_args.split())
            started.callback(stop_server, proc)
            return proc, url

        # the smoke mode starts both servers at once (their start-up is most of its time), the real run each in turn
        early = {batching: start(batching) for batching in (True, False)} if args.smoke else {}
        for batching in (True, False):
            proc, url = early.get(batching) or start(batching)
            wait_until_healthy(proc, url)
            results["batched" if batching else "one at a time"] = asyncio.run(
                load(url, body, args.requests, args.concurrency))
            stop_server(proc)
    record = {**run_header(args.tag, ceilings=not args.smoke), "model": args.model, "body": body,
              "concurrency": args.concurrency, "results": results}
    out = out_dir / f"serve_load-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"{record['date']} {record['machine']['cpu']} ({record['machine']['cores']} cores), "
          f"commit {record['commit']}; "
          f"{args.requests} requests, {args.concurrency} concurrent, {json.dumps(body)}")
    print("| mode | requests/s | generated tokens/s | p50 latency (s) | p99 latency (s) | batches | largest batch |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['requests_per_second']:.2f} | {r['generated_tokens_per_second']:.0f} | "
              f"{r['p50_seconds']:.3f} | {r['p99_seconds']:.3f} | {r['batches']} | {r['largest_batch']} |")
    ratio = results["batched"]["requests_per_second"] / results["one at a time"]["requests_per_second"]
    print(f"batching: {ratio:.2f}x the throughput")


if __name__ == "__main__":
    main()
