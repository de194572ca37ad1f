"""Benchmark: `rlhfkit serve` under 1, 8 and 32 concurrent streaming clients against transformers' plain
`model.generate`, one request at a time (what a script without a server does).

Every request asks for exactly `--new-tokens` tokens (``ignore_eos``, temperature 1.0) to one of the
bundled evaluation prompts (`bundled:eval_prompts.jsonl`), so each side produces the same number of
tokens. Reported per setting: generated tokens per second over the wall time of all requests, and the
median time to first token (server: from sending the request to the first streamed token; generate: a
`max_new_tokens=1` call). The server runs in its own process with the same torch thread count as the
baseline. On a shared, busy CPU the figures mean little: run it on an idle machine.

Usage: python bench/bench_serve.py [--model smollm2-135m-instruct] [--new-tokens 64] [--requests 32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def serve(model: str, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "rlhfkit.cli", "serve", "--model", model, "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    import httpx

    for _ in range(1200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return server, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            assert server.poll() is None, "the server exited"
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def client_run(url: str, model: str, prompts: list, clients: int, requests: int, new_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        sent = time.perf_counter()
        first, tokens = None, 0
        stream = client.chat.completions.create(
            model=model, messages=prompts[i % len(prompts)], max_tokens=new_tokens, temperature=1.0, seed=i,
            stream=True, logprobs=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs and first is None:
                first = time.perf_counter() - sent
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return first or 0.0, tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    assert tokens == requests * new_tokens, tokens
    return {"tokens_per_s": tokens / wall, "ttft_s": statistics.median(f for f, _ in results), "wall_s": wall}


def hf_run(model_name: str, prompts: list, requests: int, new_tokens: int) -> dict:
    from rlhfkit.data.encoding import prompt_ids
    from rlhfkit.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(model_name)
    model.eval()
    ids = [torch.tensor([prompt_ids(tokenizer, p)]) for p in prompts]
    kw = {"do_sample": True, "temperature": 1.0, "top_k": 0, "pad_token_id": tokenizer.pad_token_id}
    ttft = []
    with torch.inference_mode():
        for i in range(min(requests, 8)):
            start = time.perf_counter()
            model.generate(ids[i % len(ids)], max_new_tokens=1, **kw)
            ttft.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(requests):
            x = ids[i % len(ids)]
            model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        wall = time.perf_counter() - start
    return {"tokens_per_s": requests * new_tokens / wall, "ttft_s": statistics.median(ttft), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 8, 32])
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from rlhfkit.data.records import bundled_path, load_prompts
    from rlhfkit.models.loading import resolve_model

    torch.set_num_threads(args.threads)
    model = resolve_model(args.model)  # convert once, before the server and the baseline load it
    prompts = [r.prompt for r in load_prompts(bundled_path("eval_prompts.jsonl"))[:16]]
    results = {"generate, one at a time": hf_run(model, prompts, args.requests, args.new_tokens)}
    server, url = serve(model, args.threads)
    try:
        client_run(url, model, prompts, 1, 2, 8)  # warm-up
        for clients in args.clients:
            results[f"serve, {clients} clients"] = client_run(
                url, model, prompts, clients, max(args.requests, clients), args.new_tokens
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.model}, {args.new_tokens} new tokens per request, {args.threads} threads")
    for name, r in results.items():
        print(
            f"{name:28s} {r['tokens_per_s']:8.1f} tokens/s   time to first token {r['ttft_s'] * 1000:7.1f} ms"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
