"""Labelling agent episodes: `feedback prepare --env` on the tiny model and over a mocked endpoint, the
ranking page (turn by turn, escaped, no model named, flags), submissions with flags, trajectory export that
`load_preferences` reads with the sampler's own tokens, an old database upgraded in place, bad CLI input.

The hand-built episode items here (tool calls, a hostile tool output, a long one) are shared with the
browser test."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.helpers import PASSWORD, XSS, make_project

from rlhfkit.agents.env import Environment, StepResult, Task
from rlhfkit.agents.episode import AgentLimits, Episode
from rlhfkit.data.records import RankingRecord, load_preferences
from rlhfkit.data.trajectories import EpisodeTokens, TrajectoryRecord
from rlhfkit.errors import RlhfkitError
from rlhfkit.feedback import episode_prepare, store
from rlhfkit.feedback.app import create_app, display_order
from rlhfkit.feedback.episode_prepare import EpisodePrepareConfig, run_episode_prepare
from rlhfkit.feedback.episodes import NewEpisodeItem, create_episode_project, episode_items
from rlhfkit.feedback.export import export, export_rows
from rlhfkit.rollout import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")
LOOK_ENV = "tests.applications.test_feedback_episodes:LookEnv"


# ------------------------------------------------------------------------------------ environments
class LookEnv(Environment):
    """Turn 1 gets a tool result holding hostile markup; turn 2 ends the episode (no tool schemas: the tiny
    model's character tokens would make them long)."""

    name = "look"

    def tasks(self, split):
        return [Task(f"{split}-{i}", f"Say {i}.") for i in range(3)]

    def reset(self, task):
        self.turn = 0
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": task.prompt}]

    def step(self, message):
        self.turn += 1
        if self.turn == 1:
            return StepResult([{"role": "tool", "name": "look", "content": XSS}])
        return StepResult([], reward=float(len(message["content"]) % 2 == 0), done=True)


def lookup(order: int) -> str:
    """Look an order up.

    Args:
        order: The order number.
    """
    return f"order {order}: $30, delivered"


class LookupEnv(LookEnv):
    """One tool; the task "Same." gets the same answer whatever the seed (so its episodes merge into one)."""

    def tools(self):
        return [lookup]

    def tasks(self, split):
        return [Task("t0", "Refund 7."), Task("t1", "Refund 8."), Task("t2", "Same.")]

    def step(self, message):
        if message["tool_calls"]:
            return StepResult([{"role": "tool", "name": "lookup", "content": lookup(7)}])
        return StepResult([], reward=1.0, done=True, info={"reason": "answer"})


# ------------------------------------------------------------------------------------ hand-built items
def call(name: str, arguments: dict[str, Any], turn: int) -> dict[str, Any]:
    return {
        "id": f"call_{turn}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def assistant(content: str, *calls: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **({"tool_calls": list(calls)} if calls else {})}


def tool(name: str, content: str, turn: int) -> dict[str, Any]:
    return {"role": "tool", "name": name, "content": content, "tool_call_id": f"call_{turn}"}


TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "description": "Look an order up.", "parameters": {}},
    },
    {"type": "function", "function": {"name": "refund", "description": "Refund an order.", "parameters": {}}},
]
PROMPT = [{"role": "system", "content": "You are a support agent."}, {"role": "user", "content": "Refund 7."}]
LONG = "\n".join(f"log line {i}: nothing to see" for i in range(40))
EPISODES = {  # marker (the last assistant text) -> the episode's messages after the prompt
    "Refunded $30 after checking.": [
        assistant("", call("lookup", {"order": 7}, 1)), tool("lookup", "order 7: $30, delivered", 1),
        assistant("Refunding.", call("refund", {"order": 7, "amount": 30}, 2)), tool("refund", "ok", 2),
        assistant("Refunded $30 after checking."),
    ],
    "Your refund is on its way.": [
        assistant("", call("refund", {"order": 7, "amount": 300}, 1)),
        tool("refund", "refused: over the limit", 1),
        assistant("Your refund is on its way."),
    ],
    "I could not read the order.": [
        assistant("<b>Looking</b>", call("lookup", {"order": "<script>7</script>"}, 1)),
        tool("lookup", XSS, 1),
        assistant("Let me check the logs.", call("logs", {}, 2)), tool("logs", LONG, 2),
        assistant("I could not read the order."),
    ],
}  # fmt: skip


def episode_project(db: Path, users: dict[str, str], items: int = 1) -> sqlite3.Connection:
    """A project of `items` copies of the hand-built support task (three episodes), made by "model-x"."""
    conn = store.open_db(db, create=True)
    tokens = {"prompt_ids": [1, 2], "completion_ids": [3, 4, 5], "loss_mask": [1, 0, 1]}
    new = [
        NewEpisodeItem(
            PROMPT, TOOLS, f"refund-{i}", "helpdesk",
            [(messages, tokens, {"reward": 1.0, "reason": "answer", "turns": 2}, "model-x")
             for messages in EPISODES.values()],
        )
        for i in range(items)
    ]  # fmt: skip
    create_episode_project(conn, new, 1)
    for name, role in users.items():
        store.add_user(conn, name, role, PASSWORD)
    return conn


# ------------------------------------------------------------------------------------ the app in-process
def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden field {name!r}"
    return match.group(1)


def logged_in(db: Path, name: str = "ann"):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(db), follow_redirects=False)
    page = client.get("/login")
    reply = client.post(
        "/login", data={"csrf": hidden(page.text, "csrf"), "name": name, "password": PASSWORD}
    )
    assert reply.status_code == 303, reply.text
    return client


def open_next(client) -> tuple[int, str]:
    reply = client.get("/label")
    assert reply.status_code == 303, reply.text
    page = client.get(reply.headers["location"])
    assert page.status_code == 200
    return int(reply.headers["location"].rsplit("/", 1)[1]), page.text


def order_of(db: Path, user: str, item_id: int, k: int) -> list[int]:
    conn = store.open_db(db)
    try:
        secret = store.get_meta(conn, "secret") or ""
        user_id = next(u.id for u in store.users(conn) if u.name == user)
    finally:
        conn.close()
    return display_order(secret, user_id, item_id, k)


def test_the_page_shows_episodes_turn_by_turn_escaped_and_anonymous(tmp_path: Path):
    db = tmp_path / "fb.sqlite"
    episode_project(db, {"ann": "annotator"}).close()
    client = logged_in(db)
    item_id, page = open_next(client)
    assert "model-x" not in page and "helpdesk" not in page and "refund-0" not in page  # who acted, where
    assert "Episode A" in page and "Episode C" in page and "Episode D" not in page
    # hostile text from a tool, the model's content and its tool-call arguments shows as text
    assert "<script>window.__xss" not in page and "<b>Looking</b>" not in page and "<script>7" not in page
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in page and "&lt;b&gt;Looking&lt;/b&gt;" in page
    assert "lookup({&#34;order&#34;: &#34;&lt;script&gt;7&lt;/script&gt;&#34;})" in page
    assert page.count('<details class="folded">') == 1  # the 40-line log, not the short outputs
    assert "log line 0: nothing to see" in page.split('<details class="folded">')[1].split("</summary>")[0]
    assert len(re.findall(r'type="checkbox" name="flag_', page)) == 3 + 2 + 3  # one per assistant turn
    assert "Tools the agent had (2)" in page and "Refund an order." in page
    # a flag on a turn the episode does not have is refused with the page again, nothing stored
    order = order_of(db, "ann", item_id, 3)
    slot_of_short = order.index(1)  # the two-turn episode
    form = {"csrf": hidden(page, "csrf"), "submission_id": hidden(page, "submission_id"), "action": "rank",
            "rank_0": "1", "rank_1": "2", "rank_2": "3", f"flag_{slot_of_short}": ["0", "2"]}  # fmt: skip
    reply = client.post(f"/label/{item_id}", data=form)
    assert reply.status_code == 400 and "has no assistant turn &#39;2&#39; to flag" in reply.text
    reply = client.post(f"/label/{item_id}", data=form | {"action": "rank", "rank_2": ""})
    assert reply.status_code == 400 and "give every episode a rank" in reply.text
    assert store.labels(store.open_db(db)) == []


def test_ranks_and_flags_are_stored_and_exported_as_trajectory_records(tmp_path: Path):
    db = tmp_path / "fb.sqlite"
    episode_project(db, {"ann": "annotator"}, items=3).close()
    client = logged_in(db)
    markers = list(EPISODES)
    levels = {markers[0]: 0, markers[1]: 2, markers[2]: 1}  # position -> the intended level
    flagged = {markers[1]: [1], markers[2]: [0, 2]}
    for action in ("rank", "all_bad", "skip"):
        item_id, page = open_next(client)
        order = order_of(db, "ann", item_id, 3)
        form = {
            "csrf": hidden(page, "csrf"),
            "submission_id": hidden(page, "submission_id"),
            "action": action,
        }
        for slot, position in enumerate(order):
            form[f"rank_{slot}"] = str(levels[markers[position]] + 1)
            form[f"flag_{slot}"] = [str(t) for t in flagged.get(markers[position], [])]
        reply = client.post(f"/label/{item_id}", data=form)
        assert (reply.status_code, reply.headers["location"]) == (303, "/label")
    conn = store.open_db(db)
    stored = {label.kind: label for label in store.labels(conn)}
    assert stored["rank"].ranks == (0, 2, 1) and stored["rank"].flags == ((), (1,), (0, 2))
    assert stored["all_bad"].flags == ((), (1,), (0, 2)) and stored["skip"].flags is None
    out = tmp_path / "rankings.jsonl"
    assert export(conn, out, "rankings") == {"rows": 1, "all_bad": 1, "skip": 1}
    [record] = load_preferences(out)
    assert isinstance(record, TrajectoryRecord)
    assert record.ranks == (0, 2, 1) and [e.flags for e in record.episodes] == [(), (1,), (0, 2)]
    assert record.prompt == PROMPT and record.tools == TOOLS and record.task_id == "refund-0"
    assert (
        record.episodes[1].messages[0]["tool_calls"][0]["function"]["arguments"]
        == '{"order": 7, "amount": 300}'
    )
    assert record.episodes[0].tokens == EpisodeTokens((1, 2), (3, 4, 5), (1, 0, 1))
    row = json.loads(out.read_text())
    assert row["models"] == ["model-x"] * 3 and row["annotator"] == "ann" and row["returns"] == [1.0] * 3
    # pairs: one two-episode record per (better, worse) pair, each episode with its own flags
    pairs_out = tmp_path / "pairs.jsonl"
    assert export(conn, pairs_out, "pairs")["rows"] == 3
    pairs = load_preferences(pairs_out)
    assert all(isinstance(p, TrajectoryRecord) and p.ranks == (0, 1) for p in pairs)
    got = [tuple(e.messages[-1]["content"] for e in p.episodes) for p in pairs]
    assert got == [(markers[0], markers[1]), (markers[0], markers[2]), (markers[2], markers[1])]
    assert [e.flags for e in pairs[2].episodes] == [(0, 2), (1,)]


def test_an_old_database_is_upgraded_in_place_and_keeps_its_labels(tmp_path: Path):
    db = tmp_path / "old.sqlite"
    conn = make_project(db, [("Name a colour.", ["red", "blue"])], 1, {"ann": "annotator"})
    conn.execute("DROP TABLE episodes")  # the schema before episodes existed
    conn.execute("DROP TABLE episode_items")
    conn.execute("ALTER TABLE labels DROP COLUMN flags")
    conn.execute("INSERT INTO assignments VALUES (1, 1, 0, 1)")
    conn.execute("INSERT INTO labels (user_id, item_id, submission_id, kind, ranks, created) "
                 "VALUES (1, 1, 'old-label', 'rank', '[1, 0]', 0)")  # fmt: skip
    conn.close()
    conn = store.open_db(db)
    assert "flags" in {r[1] for r in conn.execute("PRAGMA table_info(labels)")}
    assert episode_items(conn) == {}
    assert [(x.user, x.ranks, x.flags) for x in store.labels(conn)] == [("ann", (1, 0), None)]
    [record] = export_rows(conn, "rankings")
    assert record["completions"] == ["red", "blue"] and record["ranking"] == [1, 0]
    store.upgrade(conn)  # idempotent
    with pytest.raises(ValueError, match="a skip flags no turn"):
        store.submit(conn, 1, 1, "another-one", "skip", flags=[[0]])


def test_a_failed_write_leaves_no_half_made_project(tmp_path: Path):
    conn = store.open_db(tmp_path / "fb.sqlite", create=True)
    good = NewEpisodeItem(PROMPT, None, "t0", "e", [(m, None, {}, "x") for m in EPISODES.values()])
    bad = NewEpisodeItem(
        PROMPT, None, "t1", "e", [(m, None, {"reward": object()}, "x") for m in EPISODES.values()]
    )
    with pytest.raises(TypeError):
        create_episode_project(conn, [good, bad], 1)
    counts = [
        conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        for t in ("items", "episode_items", "episodes")
    ]
    assert counts == [0, 0, 0] and store.get_meta(conn, "overlap") is None
    create_episode_project(conn, [good], 1)  # the database is still usable
    assert list(episode_items(conn)) == [1]


# ------------------------------------------------------------------------------------ prepare
def distinct_by_messages(episodes: list[Episode]) -> list[Episode]:
    """The episodes as prepare keeps them: the first of each distinct conversation after the prompt."""
    seen: dict[str, Episode] = {}
    for e in episodes:
        first = next(i for i, m in enumerate(e.messages) if m["role"] == "assistant")
        seen.setdefault(json.dumps(e.messages[first:], sort_keys=True), e)
    return list(seen.values())


def look_config(tiny_model: Path, db: Path) -> EpisodePrepareConfig:
    return EpisodePrepareConfig(
        env=LOOK_ENV, db=str(db), policy=str(tiny_model), k=3, overlap=1, seed=3, batch_size=4,
        agent=AgentLimits(max_turns=2, max_tokens=300, max_new_tokens=8),
        sampling=SamplingConfig(temperature=1.0),
    )  # fmt: skip


@pytest.mark.slow
def test_prepare_label_export_keeps_the_samplers_tokens(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    sampled: list[list[Episode]] = []

    def spy(*args: Any) -> list[list[Episode]]:
        sampled.extend(real(*args))
        return sampled

    real = episode_prepare.sample_episodes
    monkeypatch.setattr(episode_prepare, "sample_episodes", spy)
    db = tmp_path / "fb.sqlite"
    counts = run_episode_prepare(look_config(tiny_model, db))
    kept = [distinct_by_messages(runs) for runs in sampled]
    assert [len(runs) for runs in sampled] == [3, 3, 3] and all(len(k) >= 2 for k in kept)
    assert counts == {"items": 3, "dropped": 0, "episodes": sum(len(k) for k in kept)}
    conn = store.open_db(db)
    store.add_user(conn, "ann", "annotator", PASSWORD)
    conn.close()
    client = logged_in(db)
    item_id, page = open_next(client)
    assert (
        str(tiny_model) not in page and "&lt;script&gt;window.__xss" in page and "<script>window" not in page
    )
    k = len(kept[item_id - 1])
    order = order_of(db, "ann", item_id, k)
    form = {"csrf": hidden(page, "csrf"), "submission_id": hidden(page, "submission_id"), "action": "rank",
            "flag_0": ["1"], "flag_1": ["0"]}  # fmt: skip
    form |= {f"rank_{slot}": str(min(slot, 1) + 1) for slot in range(k)}  # A best, the others tied
    assert client.post(f"/label/{item_id}", data=form).status_code == 303
    out = tmp_path / "rankings.jsonl"
    export(store.open_db(db), out, "rankings")
    [record] = load_preferences(out)
    assert isinstance(record, TrajectoryRecord) and record.task_id == "train-0" and record.env == LOOK_ENV
    expected = kept[item_id - 1]
    assert record.prompt == expected[0].messages[:2]
    for position, episode in enumerate(expected):  # token in, token out: exactly what the sampler produced
        assert record.episodes[position].tokens == EpisodeTokens(
            tuple(episode.prompt_ids), tuple(episode.completion_ids), tuple(episode.loss_mask)
        )
        assert record.episodes[position].messages[0]["content"] == episode.messages[2]["content"]
    assert record.ranks[order[0]] == 0 and all(record.ranks[p] == 1 for p in order[1:])
    assert record.episodes[order[0]].flags == (1,) and record.episodes[order[1]].flags == (0,)
    assert all(record.episodes[p].flags == () for p in order[2:])


@pytest.mark.slow
def test_prepare_command_samples_the_first_limit_tasks_reproducibly(tiny_model: Path, tmp_path: Path):
    db = tmp_path / "cli.sqlite"
    command = [sys.executable, "-m", "rlhfkit.cli", "feedback", "prepare", "--env", LOOK_ENV, "--policy",
               str(tiny_model), "--db", str(db), "--k", "3", "--overlap", "1", "--seed", "3", "--batch-size",
               "4", "--temperature", "1.0", "--set", "limit=2", "--set", "agent.max_turns=2",
               "--set", "agent.max_tokens=300", "--set", "agent.max_new_tokens=8"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cli_items = episode_items(store.open_db(db))
    assert [i.task_id for i in cli_items.values()] == ["train-0", "train-1"]
    n = sum(len(i.episodes) for i in cli_items.values())
    assert f"2 items, {n} episodes stored" in done.stderr
    same = look_config(tiny_model, tmp_path / "again.sqlite")
    same.limit = 2
    run_episode_prepare(same)
    again = episode_items(store.open_db(same.db))
    assert [[e.tokens for e in i.episodes] for i in again.values()] == [
        [e.tokens for e in i.episodes] for i in cli_items.values()
    ]
    assert store.get_meta(store.open_db(db), "guidelines", "").startswith("Each episode is an agent")
    # prompts longer than the episode's token budget: no episode starts, nothing is written, the cause is said
    short = look_config(tiny_model, tmp_path / "short.sqlite")
    short.agent.max_tokens = 10
    with pytest.raises(
        RlhfkitError, match=r"no task got two distinct episodes \(9 max_tokens episodes never"
    ):
        run_episode_prepare(short)
    assert not Path(short.db).exists()


def test_prepare_over_an_endpoint_seeds_each_episode_and_merges_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    seeds: dict[str, list[int]] = {}

    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        last, task = body["messages"][-1], body["messages"][1]["content"]
        if last["role"] == "user":
            seeds.setdefault(task, []).append(body["seed"])
            calls = [
                {"id": "x", "type": "function", "function": {"name": "lookup", "arguments": '{"order": 7}'}}
            ]
            message = {"role": "assistant", "content": None, "tool_calls": calls}
        else:
            text = "Done." if task == "Same." else f"Done, take {body['seed'] % 2}."
            message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice], "usage": {"completion_tokens": 3}})

    from rlhfkit.chat import llm as llm_module

    real = llm_module.EndpointLLM

    def endpoint(url: str):
        client = real(url, model="m")
        client.client = httpx.Client(base_url=url, transport=httpx.MockTransport(server))
        return client

    monkeypatch.setattr(llm_module, "EndpointLLM", endpoint)
    db = tmp_path / "fb.sqlite"
    cfg = EpisodePrepareConfig(env="tests.applications.test_feedback_episodes:LookupEnv", db=str(db),
                               endpoint="http://fake/v1", k=4, seed=10, batch_size=8)  # fmt: skip
    assert run_episode_prepare(cfg) == {"items": 2, "dropped": 1, "episodes": 4}
    assert {task: sorted(s) for task, s in seeds.items()} == {
        "Refund 7.": [10, 11, 12, 13], "Refund 8.": [14, 15, 16, 17], "Same.": [18, 19, 20, 21]
    }  # fmt: skip
    items = episode_items(store.open_db(db))
    assert [i.task_id for i in items.values()] == ["t0", "t1"]
    first = items[1]
    assert first.tools is not None and first.tools[0]["function"]["name"] == "lookup"
    assert [e.tokens for e in first.episodes] == [None, None]  # a chat API gives no token ids
    assert [e.messages[-1]["content"] for e in first.episodes] == ["Done, take 0.", "Done, take 1."]
    assert first.episodes[0].messages[0]["tool_calls"][0]["function"]["name"] == "lookup"
    assert {e.model for e in first.episodes} == {"http://fake/v1"}
    asked = sum(len(s) for s in seeds.values())
    with pytest.raises(RlhfkitError, match="already holds a labelling project"):
        run_episode_prepare(cfg)
    assert sum(len(s) for s in seeds.values()) == asked  # refused before any episode was sampled


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "calc"], "needs one model that acts: --policy DIR or --endpoint URL"),
        (
            ["--env", "calc", "--policy", "tiny-llama", "--endpoint", "http://x/v1"],
            "needs one model that acts",
        ),
        (["--env", "calc", "--endpoint", "localhost:8000"], "expected the http(s) URL"),
        (["--env", "calc", "--policy", "./no/such/model"], "no such model directory"),
        (["--env", "nosuchenv", "--policy", "tiny-llama"], "not a bundled environment"),
        (["--env", "calc", "--policy", "tiny-llama", "--set", "limit=-1"], "limit: must be >= 0"),
        (["--env", "calc", "--policy", "tiny-llama", "--k", "1"], "k: must be >= 2 and <= 10, got 1"),
        (["--env", "calc", "--policy", "tiny-llama", "--set", "split=dev"], "'dev' is not one of"),
        (["--env", "calc", "--policy", "tiny-llama", "--set", "colour=1"], "unknown setting 'colour'"),
        (["--env", "calc", "--policy", "tiny-llama", "--temperature", "0"], "--temperature must be > 0"),
        (["--env", "calc", "--policy", "tiny-llama", "--model", "m"], "drop --model and --prompts"),
        (["--model", "m", "--prompts", "p.jsonl", "--set", "limit=1"], "or --env with --policy"),
        (["--policy", "tiny-llama"], "takes --model and --prompts (answers), or --env"),
    ],
)
def test_bad_prepare_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    db = tmp_path / "never.sqlite"
    result = CliRunner().invoke(app, ["feedback", "prepare", "--db", str(db), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not db.exists()


def test_answers_projects_are_unchanged_by_episodes(tmp_path: Path):
    """An answers item has no episode rows; its export is a ranking of answers, as before."""
    conn = make_project(tmp_path / "a.sqlite", [("P", ["a", "b"])], 1, {"ann": "annotator"})
    store.next_item(conn, 1)
    assert store.submit(conn, 1, 1, "s-1", "rank", [1, 0]) is store.Outcome.STORED
    assert episode_items(conn) == {} and store.labels(conn)[0].flags is None
    out = tmp_path / "r.jsonl"
    export(conn, out, "rankings")
    assert [type(r) for r in load_preferences(out)] == [RankingRecord]
