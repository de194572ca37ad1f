"""Memory of `rlhfkit serve` over 500 requests (half streamed, 8 concurrent clients, 32 tokens each): the
server's resident memory after every 100 requests should stay flat once warm.

Usage: python bench/serve_memory.py [MODEL]   (default: the tiny random model)
"""

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
model = sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
srv = subprocess.Popen(
    [sys.executable, "-m", "rlhfkit.cli", "serve", "--model", model, "--port", str(port)],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")},
)
for _ in range(600):
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        break
    except httpx.TransportError:
        time.sleep(0.1)
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)


def rss() -> int:
    """The server's resident memory in MiB."""
    with open(f"/proc/{srv.pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) // 1024


def one(i):
    stream = i % 2 == 0
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Item {i}?"}],
        max_tokens=32,
        temperature=1.0,
        seed=i,
        stream=stream,
    )
    if stream:
        for _ in r:
            pass


readings = [(0, rss())]
with ThreadPoolExecutor(8) as pool:
    for k in range(5):
        list(pool.map(one, range(k * 100, (k + 1) * 100)))
        readings.append(((k + 1) * 100, rss()))
srv.terminate()
srv.wait()
print("requests -> server RSS MiB:", readings)
