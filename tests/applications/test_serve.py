"""`rlhfkit serve` as users run it: a real server subprocess on a free port, driven by the official `openai`
package (and raw httpx where the client would hide what we check).

The tiny random model answers noise, so the served model is first taught, in a few seconds of training
(`taught_model`), three exact answers: a plain one, a tool call for a weather question (in the fallback
format the server renders, built by the server's own `fallback_messages`), and a final answer after the
tool's result. The tool round trip below is therefore the model's own call, parsed by the server; nothing
in the server is scripted. `tool_choice="required"` on a question it was not taught shows the other side:
a malformed forced call comes back as content, not as an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from tests.helpers import running_server

from rlhfkit.chat.llm import EndpointLLM, load_llm
from rlhfkit.data.encoding import pad, prompt_answer_ids, prompt_ids
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import load_causal_lm, save_model
from rlhfkit.rollout import RolloutEngine, SamplingConfig
from rlhfkit.serve.app import create_app
from rlhfkit.serve.tools import fallback_messages

KEY = "sk-test-0123456789"
MODEL = "taught"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]  # fmt: skip
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
FRANCE_ANSWER = "Paris is the capital of France."
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
RESULT = [{"role": "assistant", "content": None, "tool_calls": [CALL]},
          {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}]  # fmt: skip
FINAL_ANSWER = "It is sunny in Paris, 24 C."
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

# every test here talks to one real server process, started after a few seconds of teaching the model
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def taught_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, one_thread: None) -> Path:
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(str(tiny_model))
    examples = [
        (FRANCE, FRANCE_ANSWER),
        (fallback_messages(WEATHER, TOOLS), CALL_TEXT),
        (fallback_messages(WEATHER + RESULT, TOOLS), FINAL_ANSWER),
    ]
    pairs = [prompt_answer_ids(tokenizer, p, [{"role": "assistant", "content": a}]) for p, a in examples]
    ids, mask, positions = pad([p + a for p, a in pairs], tokenizer.pad_token_id)  # (3, T) each
    labels = ids.masked_fill(mask == 0, -100)  # (3, T) the answers only
    for i, (p, _) in enumerate(pairs):
        labels[i, : len(p)] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):  # ~120 steps, a few seconds on one thread
        loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    return save_model(model.eval(), tokenizer, tmp_path_factory.mktemp("taught"))


@pytest.fixture(scope="module")
def server(taught_model: Path) -> Iterator[str]:
    with running_server(taught_model, "--api-key", KEY, "--max-batch", "32", "--max-tokens", "1000") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


def health(server: str) -> dict:
    return httpx.get(server.removesuffix("/v1") + "/health", timeout=10).json()


def ask(client: openai.OpenAI, messages: list, **kw):
    return client.chat.completions.create(model=str(client.served), messages=messages, **kw)


@pytest.fixture(scope="module", autouse=True)
def _served_name(client: openai.OpenAI, taught_model: Path) -> None:
    client.served = str(taught_model)  # the server's model id is the --model it was given


# ------------------------------------------------------------------------------------------ chat
def test_models_health_and_a_plain_answer(client: openai.OpenAI, server: str, taught_model: Path):
    assert [m.id for m in client.models.list().data] == [str(taught_model)]
    assert health(server)["status"] == "ok"  # /health needs no key
    reply = ask(client, FRANCE, temperature=0, max_tokens=64)
    choice = reply.choices[0]
    assert choice.message.content == FRANCE_ANSWER
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    _, tokenizer = load_causal_lm(str(taught_model))
    assert reply.usage.prompt_tokens == len(prompt_ids(tokenizer, FRANCE))
    assert reply.usage.completion_tokens == len(FRANCE_ANSWER) + 1  # a character tokenizer, plus EOS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    cut = ask(client, FRANCE, temperature=0, max_completion_tokens=5)
    assert cut.choices[0].message.content == FRANCE_ANSWER[:5] and cut.choices[0].finish_reason == "length"


def test_streamed_chunks_add_up_to_the_unstreamed_answer(client: openai.OpenAI):
    for messages, kw in [(FRANCE, {"temperature": 0}), (WEATHER, {"temperature": 1.0, "seed": 3})]:
        whole = ask(client, messages, max_tokens=40, **kw)
        chunks = list(
            ask(client, messages, max_tokens=40, stream=True, stream_options={"include_usage": True}, **kw)
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # the usage chunk comes last
    raw = httpx.post(
        f"{client.base_url}chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
        json={"model": client.served, "messages": FRANCE, "max_tokens": 8, "stream": True},
    )  # fmt: skip
    lines = [x for x in raw.text.split("\n\n") if x]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_n_choices_and_seeds(client: openai.OpenAI):
    first = ask(client, WEATHER, n=3, temperature=2.0, seed=7, max_tokens=12)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    again = ask(client, WEATHER, n=3, temperature=2.0, seed=7, max_tokens=12)
    assert [c.message.content for c in again.choices] == texts  # same seed, same request: same answers
    other = ask(client, WEATHER, n=3, temperature=2.0, seed=8, max_tokens=12)
    assert [c.message.content for c in other.choices] != texts


def test_logprobs_cover_every_token_with_the_most_likely_first(client: openai.OpenAI):
    reply = ask(client, FRANCE, temperature=0, max_tokens=64, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content[:-1]) == FRANCE_ANSWER and content[-1].token == "<|im_end|>"
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.logprob == pytest.approx(tops[0])  # greedy
        assert t.logprob <= 0 and sum(torch.tensor(tops).exp()) <= 1 + 1e-5
        assert t.bytes == list(t.token.encode())


def test_stop_strings_cut_the_answer(client: openai.OpenAI):
    reply = ask(client, FRANCE, temperature=0, max_tokens=64, stop=[" capital", "zzz"])
    assert reply.choices[0].message.content == "Paris is the" and reply.choices[0].finish_reason == "stop"
    chunks = list(ask(client, FRANCE, temperature=0, max_tokens=64, stop=" capital", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Paris is the"


def test_text_completions(client: openai.OpenAI):
    reply = client.completions.create(
        model=client.served,
        prompt=["The sky is", "Blue"],
        max_tokens=6,
        n=2,
        seed=1,
        logprobs=2,
        temperature=1.0,
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for c in reply.choices:
        assert len(c.logprobs.tokens) == 6 and c.finish_reason == "length"
        assert "".join(c.logprobs.tokens) == c.text  # the raw continuation: nothing stripped
    assert (
        reply.usage.prompt_tokens == len("The sky is") + len("Blue") and reply.usage.completion_tokens == 24
    )
    echo = client.completions.create(
        model=client.served, prompt="The sky is", max_tokens=4, seed=1, echo=True
    )
    assert (
        echo.choices[0].text.startswith("The sky is") and len(echo.choices[0].text) == len("The sky is") + 4
    )


# ------------------------------------------------------------------------------------------ tools
def test_a_tool_call_round_trip(client: openai.OpenAI):
    reply = ask(client, WEATHER, tools=TOOLS, temperature=0, max_tokens=120)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # streamed: the same call as delta.tool_calls fragments
    chunks = list(ask(client, WEATHER, tools=TOOLS, temperature=0, max_tokens=120, stream=True))
    fragments = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert fragments[0].function.name == "get_weather" and fragments[0].id
    assert json.loads("".join(f.function.arguments or "" for f in fragments)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)
    # the tool's result goes back; the model answers with it
    history = [*WEATHER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]  # fmt: skip
    final = ask(client, history, tools=TOOLS, temperature=0, max_tokens=60)
    assert final.choices[0].message.content == FINAL_ANSWER and final.choices[0].finish_reason == "stop"


def test_a_malformed_forced_call_comes_back_as_content(client: openai.OpenAI):
    reply = ask(client, FRANCE, tools=TOOLS, tool_choice="required", temperature=1.0, seed=0, max_tokens=20)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.message.content.startswith('<tool_call>\n{"name": "')
    none = ask(client, WEATHER, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30)
    assert none.choices[0].message.tool_calls is None  # no tools rendered, none read


# ------------------------------------------------------------------------------------------ errors
def post(
    server: str, body: bytes | dict, key: str | None = KEY, path: str = "/chat/completions"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        return httpx.post(server + path, json=body, headers=headers, timeout=60)
    return httpx.post(
        server + path, content=body, headers=headers | {"content-type": "application/json"}, timeout=60
    )


def test_bad_requests_get_openai_errors_naming_the_field(client: openai.OpenAI, server: str):
    ok = {"model": client.served, "messages": FRANCE, "max_tokens": 4}
    cases = [
        (b'{"model": "x", "messages": [', 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        ({**ok, "model": "gpt-9"}, 404, "model", "does not exist"),
        ({**ok, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
        ({**ok, "messages": []}, 400, "messages", "at least 1"),
        ({**ok, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "system"),
        ({**ok, "messages": [{"role": "user"}]}, 400, "messages[0]", "needs content"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
         "messages[0].content", "only text"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
        ({**ok, "max_tokens": 100_000}, 400, "max_tokens", "at most 1000"),
        ({**ok, "n": 33}, 400, "n", "at most 32"),
        ({**ok, "top_logprobs": 2}, 400, None, "needs logprobs"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ({**ok, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
        ({**ok, "tempature": 0.5}, 400, "tempature", "unrecognised"),
        ({**ok, "tool_choice": {"type": "function", "function": {"name": "f"}}, "tools": TOOLS}, 400, None,
         "not in tools"),
        ({**ok, "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "messages", "context"),
        ({**ok, "messages": [{"role": "user", "content": "x" * 900}], "max_tokens": 200}, 400, "max_tokens",
         "context of 1024"),
    ]  # fmt: skip
    for body, status, param, words in cases:
        reply = post(server, body)
        assert reply.status_code == status, (body, reply.text)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (body, error)
        assert words in error["message"], (body, error)
        assert "Traceback" not in reply.text
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=FRANCE)
    too_big = post(server, b'{"model": "x", "pad": "' + b"a" * (5 * 1024 * 1024) + b'"}')
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert ask(client, FRANCE, temperature=0, max_tokens=64).choices[0].message.content == FRANCE_ANSWER


def test_a_key_is_needed_everywhere_but_health(client: openai.OpenAI, server: str):
    for key in (None, "sk-wrong", KEY + "x"):
        reply = post(server, {"model": client.served, "messages": FRANCE}, key=key)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/models").status_code == 401
    wrong = openai.OpenAI(base_url=server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200


# ------------------------------------------------------------------------------------------ batching
def wait_idle(server: str, seconds: float) -> float:
    start = time.monotonic()
    while health(server)["running"] or health(server)["waiting"]:
        assert time.monotonic() - start < seconds, health(server)
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_client_that_goes_away_cancels_its_generation(client: openai.OpenAI, server: str):
    # 32 answers of 960 tokens: seconds of work, against the milliseconds the client stays
    long = {"model": client.served, "messages": FRANCE, "max_tokens": 960, "ignore_eos": True, "n": 32}
    auth = {"Authorization": f"Bearer {KEY}"}
    before = health(server)["cancelled"]
    with httpx.stream("POST", server + "/chat/completions", json={**long, "stream": True}, timeout=60,
                      headers=auth) as reply:  # fmt: skip
        assert reply.status_code == 200, reply.read()
        for i, _ in enumerate(reply.iter_lines()):
            if i == 6:
                break
    wait_idle(server, 5)
    assert health(server)["cancelled"] == before + 32  # dropped unfinished, not run to their 960 tokens
    with pytest.raises(httpx.ReadTimeout):  # unstreamed, given up after 0.3 s
        httpx.post(server + "/chat/completions", json=long, headers=auth, timeout=0.3)
    wait_idle(server, 5)
    assert health(server)["cancelled"] == before + 64


def test_many_concurrent_streams_share_decode_steps_and_all_complete(client: openai.OpenAI, server: str):
    counts = [8 + 2 * i for i in range(24)]  # they leave at different steps

    def one(i: int) -> tuple[int, int, str]:
        chunks = list(ask(client, WEATHER if i % 2 else FRANCE, max_tokens=counts[i], temperature=1.0, seed=i,
                          stream=True, logprobs=True, stream_options={"include_usage": True},
                          extra_body={"ignore_eos": True}))  # fmt: skip
        tokens = sum(
            len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs
        )
        finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
        return chunks[-1].usage.completion_tokens, tokens, finish

    peak_before = health(server)["peak_running"]
    start = time.monotonic()
    with ThreadPoolExecutor(len(counts)) as pool:
        results = list(pool.map(one, range(len(counts))))
    elapsed = time.monotonic() - start
    assert results == [(n, n, "length") for n in counts]  # every token streamed and counted
    assert health(server)["peak_running"] >= max(peak_before, 8)  # they really were decoded together
    assert elapsed < 20, f"{elapsed:.1f} s"


def test_over_capacity_gets_429_with_retry_after(taught_model: Path):
    """In process, with the scheduler never started (no lifespan), so the queue stays full: the tiny model
    finishes any request over a socket before a second one could be sent."""
    model, tokenizer = load_causal_lm(str(taught_model))
    app = create_app(RolloutEngine(model.eval(), tokenizer), "m", max_batch=1, max_queue=1)
    body = {"model": "m", "messages": FRANCE, "max_tokens": 8}

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            waiting = [asyncio.create_task(c.post("/v1/chat/completions", json=body)) for _ in range(2)]
            while app.state.scheduler.stats()["waiting"] < 2:
                await asyncio.sleep(0.01)
            refused = await c.post("/v1/chat/completions", json=body)
            for task in waiting:
                task.cancel()
            return refused

    # a thread of its own: another test module (the browser tests' sync Playwright) may leave an event loop
    # running in this one, and asyncio.run refuses to nest
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        refused = pool.submit(lambda: asyncio.run(asyncio.wait_for(go(), 30))).result()
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


# ------------------------------------------------------------------------------------------ clients
def test_endpoint_llm_equals_the_openai_client(client: openai.OpenAI, server: str):
    llm = load_llm(server, api_key=KEY)
    assert isinstance(llm, EndpointLLM) and llm.model == client.served
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9)
    [[ours], [theirs]] = llm.chat([FRANCE, WEATHER], sampling, seed=5)
    reply = ask(client, FRANCE, max_tokens=16, temperature=1.0, top_p=0.9, seed=5)
    assert ours.text == reply.choices[0].message.content
    assert (
        ours.tokens == reply.usage.completion_tokens and ours.finish_reason == reply.choices[0].finish_reason
    )
    assert (
        theirs.text
        == ask(client, WEATHER, max_tokens=16, temperature=1.0, top_p=0.9, seed=6).choices[0].message.content
    )
    three = llm.chat([FRANCE], SamplingConfig(max_new_tokens=6, temperature=2.0), n=3, seed=1)[0]
    assert len(three) == 3 and all(c.tokens <= 6 for c in three)
    assert [c.finish_reason for c in three] == ["length" if c.tokens == 6 else "stop" for c in three]
    with pytest.raises(RlhfkitError, match="HTTP 401"):
        EndpointLLM(server, model=client.served, api_key="sk-wrong").chat([FRANCE], sampling)
