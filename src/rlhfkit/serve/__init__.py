"""`rlhfkit serve`: an OpenAI-compatible server over a local model, with continuous batching.

`app` is the HTTP layer, `protocol` the request formats, `scheduler` the batching, `responses` the
bodies and stream chunks, `tools` the rendering of tools, `text` the incremental decoding. The server
owns no model code: it loads with `models.load_causal_lm` and samples with the rollout engine.
"""

from __future__ import annotations

from typing import Any


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 128,
    max_tokens: int = 2048,
    trust_remote_code: bool = False,
    **uvicorn_options: Any,
) -> None:
    """Load `model` (a directory or registered name) and serve it until interrupted."""
    import uvicorn

    from rlhfkit.console import console
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.rollout import RolloutEngine
    from rlhfkit.serve.app import create_app

    if max_batch < 1 or max_queue < 0 or max_tokens < 1:
        raise RlhfkitError(
            f"--max-batch and --max-tokens must be at least 1 and --max-queue at least 0, got {max_batch}, "
            f"{max_tokens} and {max_queue}"
        )
    policy, tokenizer = load_causal_lm(model, trust_remote_code=trust_remote_code)
    policy.requires_grad_(False).eval()
    engine = RolloutEngine(policy, tokenizer)
    app = create_app(engine, model, api_key, max_batch, max_queue, max_tokens)
    auth = "an API key" if api_key else "no API key"
    console.print(
        f"[bold]serve[/]: {model} on http://{host}:{port}/v1 ({auth}, up to {max_batch} rows at once)"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", **uvicorn_options)
