"""glibc malloc keeps freed memory (rlhfkit.allocator): on by default, off on request, and it does keep it;
`release_freed_memory` hands it back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocates and frees a 200 MB tensor, prints whether the tuning applied and the RSS growth it left (MB).
PROBE = """
import torch
from rlhfkit.allocator import keep_freed_memory
applied = keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss()
x = torch.ones(50 * 2**20)  # 200 MB, touched
del x
if RELEASE:
    from rlhfkit.allocator import release_freed_memory
    release_freed_memory()
print(applied, round(rss() - before))
"""


def probe(release: bool = False, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RLHFKIT_MALLOC")}
    code = f"RELEASE = {release}\n{PROBE}"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.slow
def test_freed_memory_is_kept_by_default_and_returned_when_asked():
    applied, kept = probe()
    assert applied and kept >= 190, kept  # the freed 200 MB stays in the heap for the next step
    applied, kept = probe(RLHFKIT_MALLOC="system")
    assert not applied and kept < 20, kept  # glibc's default: a block this large goes back to the kernel
    applied, _ = probe(MALLOC_MMAP_THRESHOLD_="65536")  # the user's own glibc setting wins
    assert not applied
    applied, kept = probe(release=True)  # between a pipeline's stages: the kept memory goes back
    assert applied and kept < 20, kept
