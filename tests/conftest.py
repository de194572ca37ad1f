"""Shared fixtures: a tiny random Llama (character tokenizer, ChatML) and an isolated cache."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's cache (and never download anything).
os.environ.setdefault("RLHFKIT_CACHE", tempfile.mkdtemp(prefix="rlhfkit-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the `chromium` fixture are marked `browser` (`make test-fast` leaves them out).
    `@pytest.mark.cuda` tests run only where CUDA is: skipped elsewhere, with the reason."""
    for item in items:
        if "chromium" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On a machine with CUDA, a cuda-marked test that skips itself (pytest.skip, importorskip, a skipif that
    went wrong) is a failure: a GPU check must never pass silently where the GPU is there."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "cuda" in item.keywords:
        import torch

        if torch.cuda.is_available():
            report.outcome = "failed"
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
            report.longrepr = f"cuda test skipped on a machine with CUDA (a failure here): {reason}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlhfkit.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


MEMORY_ROWS = [
    {"messages": [{"role": "user", "content": f"Item {i}?"}, {"role": "assistant", "content": answer}]}
    for i, answer in enumerate(
        [
            "red fox.",
            "blue sky.",
            "green tea.",
            "gold ring.",
            "grey owl.",
            "pink rose.",
            "tan dune.",
            "jet ink.",
        ]
    )
]


@pytest.fixture()
def memory_data(tmp_path: Path) -> Path:
    """Eight short conversations whose answers a tiny model can memorise in a few dozen steps."""
    return write_jsonl(tmp_path / "memory.jsonl", MEMORY_ROWS)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium driven by Playwright (never a downloaded browser). Skipped where it is
    not installed; under CI (.ci/run installs it and sets CI) its absence is a failure, not a skip."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed")  # by design: outside CI only; CI fails above instead
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def read_metrics(out: Path, split: str) -> list[dict]:
    """The metrics.jsonl lines of one split ("train", "eval", ...) of a run directory."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["split"] == split]


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """`train.threads=1` sets torch's global thread count; give the next test module its default back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: threads only add overhead there (and stall when
    the CPU is busy). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port nothing listens on now (for a server a test starts)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(server, url: str, timeout: float) -> None:
    """Poll `url` until the server subprocess answers; fail with its stderr if it exits first."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, server.stderr.read().decode()
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
