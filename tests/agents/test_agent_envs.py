"""The bundled agent environments: tools, checkers, splits, the SQLite guard, the bubblewrap sandbox and
the demonstrations (issue 17). No model is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from rlhfkit.agents import calc, db_tasks, os_tasks
from rlhfkit.agents.calc import CalcEnvironment, calculator
from rlhfkit.agents.db import DBEnvironment, answer_matches
from rlhfkit.agents.demos import demos_path, replay, turn_records
from rlhfkit.agents.env import Task
from rlhfkit.agents.registry import load_environment
from rlhfkit.agents.sandbox import check_sandbox
from rlhfkit.agents.tools import ToolEnvironment, chat_messages, tool_schema
from rlhfkit.data.toolcalls import ToolCall
from rlhfkit.errors import ConfigError


def call(name: str, arguments: dict | str) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"role": "assistant", "content": "", "tool_calls": [ToolCall(name, text)]}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text, "tool_calls": []}


def observe(env, name: str, arguments: dict | str) -> str:
    result = env.step(call(name, arguments))
    assert not result.done and result.reward == 0.0 and len(result.observations) == 1
    assert result.observations[0]["role"] == "tool" and result.observations[0]["name"] == name
    return result.observations[0]["content"]


# ------------------------------------------------------------------------------------------ calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("0.1 + 0.2", "0.3"),  # exact fractions, not floats
        ("(37 * 4.25 + 12) * 0.85", "143.8625"),
        ("1,234.5 * 2", "2469"),
        ("$12 * 3", "36"),
        ("2^10", "1024"),
        ("-3**2", "-9"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("1/3", "0.333333333333"),
        ("2 ** 0.5", "1.41421356237"),
        ("2 ** -2", "0.25"),
        ("4837 * 2958", "14307846"),
        ("200 * 15%", "30"),  # a percentage
        ("(1 - 12.5%) * 80", "70"),
        ("7 % 3", "1"),  # modulo when an operand follows
    ],
)
def test_calculator_computes_exactly(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("__import__('os').system('id')", "error: function calls are not allowed"),
        ("x + 1", "error: names are not allowed ('x')"),
        ("(1).real", "error: 'Attribute' is not allowed"),
        ("'a' * 3", "error: 'Constant' is not allowed"),
        ("[1] * 10**9", "error: 'List' is not allowed"),
        ("10 ** 10000", "error: the exponent 10000 is too large (at most 1000)"),
        ("2 ** 3 ** 5 ** 2", "error: the exponent 847288609443 is too large"),
        ("9 ** 999", "error: the result is too large"),
        ("1 / 0", "error: division by zero"),
        ("1 +", "error: cannot read the expression"),
        ("", "error: the expression is empty"),
        ("1+" * 200 + "1", "error: the expression is too long (at most 300 characters)"),
    ],
)
def test_calculator_refuses_with_a_message(expression, error):
    assert calculator(expression).startswith(error)


def test_calc_checker_reads_the_last_number():
    env = CalcEnvironment()
    task = Task("t", "q", {"answer": "1234.5"})
    for good in ["The total is $1,234.50.", "1234.5", "so 1000 + 234.5 = 1,234.5", "Answer: 1234.500001"]:
        assert env.check(task, good) == 1.0, good
    for bad in ["about 1234", "1234.5 dollars, or 1300 with tax", "no idea", "1,234.6", "-1234.5"]:
        assert env.check(task, bad) == 0.0, bad
    assert env.check(Task("t", "q", {"answer": "-3"}), "it drops to -3") == 1.0
    assert env.check(Task("t", "q", {"answer": "12.5"}), "12.50") == 1.0


def test_calc_splits_are_deterministic_disjoint_and_correct():
    train, test = calc.make_tasks("train"), calc.make_tasks("test")
    assert (len(train), len(test)) == (2000, 200)
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    assert len({t.prompt for t in train}) == 2000
    calc.make_tasks.cache_clear()
    assert calc.make_tasks("test") == test  # the same tasks again, not a cached object
    first = test[0]  # pinned: the same on every machine (string seeds)
    assert first.prompt.startswith("A bus leaves Austin and drives at 114 km/h for 2.25 hours")
    assert first.data == {"answer": "432", "expression": "114 * 2.25 + 54 * 3.25"}
    env = CalcEnvironment()
    for task in test:  # every gold answer is what the calculator gives for the gold expression
        assert env.check(task, calculator(task.data["expression"])) == 1.0
        if "dollars" in task.prompt:  # money in whole cents
            assert len(task.data["answer"].partition(".")[2]) <= 2


# ------------------------------------------------------------------------------------ tool environment


def nodoc(x: int) -> int:
    return x


def hang(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    threading.Event().wait()
    return "never"


def boom(text: str) -> str:
    """Fail.

    Args:
        text: Anything.
    """
    raise RuntimeError(f"kaboom on {text}")


def long(n: int) -> str:
    """Return n x's.

    Args:
        n: How many.
    """
    return "x" * n


class Toy(ToolEnvironment):
    name = "toy"

    def tools(self):
        return [hang, boom, long, calculator]

    def tasks(self, split):
        return [Task("toy-0", "Say 7.", {})]

    def instructions(self, task):
        return "Be brief."

    def check(self, task, answer):
        return float(answer.strip() == "7")


def test_tool_schema_from_hints_and_docstring():
    assert tool_schema(calculator) == {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression exactly.",
            "parameters": {
                "type": "object",
                "properties": {
                    "expression": {
                        "type": "string",
                        "description": "Numbers with + - * / // % ** and parentheses, "
                        'e.g. "(37 * 4.25 + 12) * 0.85".',
                    }
                },
                "required": ["expression"],
            },
        },  # no "return": OpenAI's format has no such field (rlhfkit serve refuses it)
    }
    with pytest.raises(ConfigError, match=r"^tool nodoc: .*Google-style docstring"):
        tool_schema(nodoc)


def test_broken_tool_calls_are_error_observations():
    env = Toy()
    env.reset(env.tasks("train")[0])
    assert (
        observe(env, "python", {"code": "1"})
        == "error: unknown tool 'python'; the tools are: hang, boom, long, calculator"
    )
    assert observe(env, "calculator", '{"expression": ').startswith(
        "error: the arguments of calculator are not valid JSON: "
    )
    assert (
        observe(env, "calculator", "[1, 2]")
        == "error: the arguments of calculator must be a JSON object, not [1, 2]"
    )
    assert (
        observe(env, "calculator", {})
        == "error: bad arguments for calculator: missing a required argument: 'expression'"
    )
    assert observe(env, "calculator", {"expression": "1", "x": 2}) == (
        "error: bad arguments for calculator: got an unexpected keyword argument 'x'"
    )
    assert observe(env, "calculator", {"expression": 5}) == (
        "error: bad arguments for calculator: argument 'expression' must be a string, not 5"
    )
    assert (
        observe(env, "boom", {"text": "purpose"})
        == "error: tool boom failed: RuntimeError: kaboom on purpose"
    )
    assert observe(env, "calculator", {"expression": "6 * 7"}) == "42"


def test_a_hanging_tool_ends_by_timeout_and_the_episode_goes_on():
    env = Toy(tool_timeout=0.3)
    env.reset(env.tasks("train")[0])
    start = time.monotonic()
    assert observe(env, "hang", {"seconds": 100}) == "error: tool hang timed out after 0.3 s"
    assert time.monotonic() - start < 2
    assert Toy().tool_timeout == 5.0  # the default: "... timed out after 5 s"
    assert observe(env, "calculator", {"expression": "2 + 2"}) == "4"


def test_long_output_is_cut_with_a_marker():
    env = Toy(max_output_chars=100)
    env.reset(env.tasks("train")[0])
    assert observe(env, "long", {"n": 5000}) == "x" * 100 + "\n... [output truncated: 4900 more characters]"
    assert observe(env, "long", {"n": 100}) == "x" * 100


def test_a_turn_without_calls_is_the_checked_final_answer():
    env = Toy()
    messages = env.reset(env.tasks("train")[0])
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say 7."}]
    end = env.step(answer("7"))
    assert (end.observations, end.reward, end.done, end.info) == (
        [],
        1.0,
        True,
        {"reason": "answer", "correct": True},
    )
    env.reset(env.tasks("train")[0])
    end = env.step(answer("8"))
    assert (end.reward, end.done, end.info) == (0.0, True, {"reason": "answer", "correct": False})


def test_chat_messages_render_like_the_server_fallback():
    episode = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {
            "role": "assistant",
            "content": "Let me see.",
            "tool_calls": [ToolCall("f", '{"x": 1}'), ToolCall("g", "{}")],
        },
        {"role": "tool", "name": "f", "content": "one"},
        {"role": "tool", "name": "g", "content": "two"},
        {"role": "assistant", "content": "Done."},
    ]
    rendered = chat_messages(episode, None)
    assert rendered == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {
            "role": "assistant",
            "content": 'Let me see.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
        },
        {
            "role": "user",
            "content": "<tool_response>\none\n</tool_response>\n<tool_response>\ntwo\n</tool_response>",
        },
        {"role": "assistant", "content": "Done."},
    ]
    with_tools = chat_messages(episode, [tool_schema(calculator)])
    assert with_tools[0]["content"].startswith("S\n\nYou can call these tools (JSON schema):\n")
    assert with_tools[1:] == rendered[1:]


# ------------------------------------------------------------------------------------------------ db

TABLES = [
    {
        "name": "t",
        "columns": [["name", "TEXT"], ["x", "REAL"]],
        "rows": [["a", 1.5], ["b", 2.25], ["c", None]],
    }
]
TOY_DB = Task("db-toy", "q", {"tables": TABLES, "answer": 3, "kind": "number", "choices": []})


def test_sql_results_are_small_text_tables():
    env = DBEnvironment(max_rows=2)
    env.reset(TOY_DB)
    assert (
        observe(env, "sql", {"query": "SELECT * FROM t ORDER BY name LIMIT 2"})
        == "name | x\na | 1.5\nb | 2.25"
    )
    assert observe(env, "sql", {"query": "SELECT * FROM t ORDER BY name"}) == (
        "name | x\na | 1.5\nb | 2.25\n... (more than 2 rows; narrow the query)"
    )
    assert observe(env, "sql", {"query": "SELECT name FROM t WHERE x > 9"}) == "name\n(no rows)"
    assert observe(env, "sql", {"query": "SELECT nope FROM t"}) == "error: no such column: nope"
    assert observe(env, "sql", {"query": "PRAGMA table_info(t)"}).startswith("cid | name | type")
    env.close()


def test_sql_cannot_write_attach_or_change_pragmas(tmp_path):
    env = DBEnvironment()
    env.reset(TOY_DB)
    path = Path(env.workdir) / "task.sqlite"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    attempts = [
        "INSERT INTO t VALUES ('d', 9)",
        "UPDATE t SET x = 0",
        "DELETE FROM t",
        "DROP TABLE t",
        "CREATE TABLE u (a)",
        f"ATTACH DATABASE '{tmp_path / 'evil.db'}' AS evil",
        "PRAGMA writable_schema = ON",
        "PRAGMA query_only = OFF",
        "PRAGMA journal_mode = WAL",
        "SELECT load_extension('/tmp/evil')",
    ]
    for query in attempts:
        content = observe(env, "sql", {"query": query})
        assert content.startswith("error: not authorized"), (query, content)
    assert observe(env, "sql", {"query": "SELECT 1; DELETE FROM t"}).startswith(
        "error: You can only execute one"
    )
    assert observe(env, "sql", {"query": "SELECT COUNT(*), SUM(x) FROM t"}) == "COUNT(*) | SUM(x)\n3 | 3.75"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not (tmp_path / "evil.db").exists()
    env.close()
    assert not path.exists()  # the episode's copy is removed


def test_a_slow_query_is_stopped():
    env = DBEnvironment(query_timeout=0.5)
    env.reset(TOY_DB)
    start = time.monotonic()
    slow = "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c) SELECT COUNT(*) FROM c"
    assert observe(env, "sql", {"query": slow}) == "error: the query ran longer than 0.5 s and was stopped"
    assert time.monotonic() - start < 3
    assert observe(env, "sql", {"query": "SELECT COUNT(*) FROM t"}) == "COUNT(*)\n3"  # usable afterwards
    env.close()


def test_db_checker_numbers_names_and_lists():
    number = {"answer": 53712.333333, "kind": "number", "choices": []}
    assert answer_matches(number, "53712.33") and answer_matches(number, "The average is 53,712.3333.")
    assert not answer_matches(number, "53700")
    text = {"answer": "Sales", "kind": "text", "choices": ["Sales", "Marketing", "Finance"]}
    assert answer_matches(text, "sales") and answer_matches(text, "The department is Sales.")
    assert not answer_matches(text, "Sales or Marketing") and not answer_matches(text, "Finance")
    names = {"answer": ["Alice", "Bob"], "kind": "list", "choices": ["Alice", "Bob", "Ann", "Anna"]}
    assert answer_matches(names, "bob, Alice") and answer_matches(names, "The employees are Alice and Bob.")
    assert not answer_matches(names, "Alice") and not answer_matches(names, "Alice, Bob, Anna")
    assert answer_matches({"answer": ["Anna"], "kind": "list", "choices": ["Ann", "Anna"]}, "Anna")


def test_db_splits_are_deterministic_disjoint_and_gold_checks():
    train, test = db_tasks.make_tasks("train"), db_tasks.make_tasks("test")
    assert (len(train), len(test)) == (1000, 150)
    key = lambda t: json.dumps([t.prompt, t.data["tables"]])  # noqa: E731
    assert not {key(t) for t in train} & {key(t) for t in test}
    db_tasks.make_tasks.cache_clear()
    assert db_tasks.make_tasks("test") == test
    assert all(len(table["rows"]) <= 15 for t in train + test for table in t.data["tables"])
    assert {t.data["kind"] for t in test} == {"number", "text", "list"}
    env = DBEnvironment()
    for task in test:  # the gold SQL run through the tool gives a result the checker accepts
        env.reset(task)
        result = observe(env, "sql", {"query": task.data["sql"]})
        values = [line.split(" | ")[0] for line in result.splitlines()[1:]]
        reply = ", ".join(values) if task.data["kind"] == "list" else values[0]
        assert env.step(answer(reply)).info["correct"], (task.id, reply)
    env.close()


# ------------------------------------------------------------------------------------------------ os


@pytest.fixture(scope="module")
def os_env():
    env = load_environment("os", command_timeout=3)
    yield env
    env.close()


def test_os_without_bubblewrap_is_a_one_line_config_error(monkeypatch):
    import rlhfkit.agents.sandbox as sandbox

    check_sandbox.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError) as info:
        load_environment("os")
    assert "`bwrap` is not on PATH" in str(info.value) and "apt-get install bubblewrap" in str(info.value)
    assert "\n" not in str(info.value)
    check_sandbox.cache_clear()


def test_os_when_bwrap_cannot_make_a_sandbox(monkeypatch, tmp_path):
    import rlhfkit.agents.sandbox as sandbox

    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    check_sandbox.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: str(fake))
    with pytest.raises(ConfigError) as info:
        load_environment("os")
    assert str(info.value).startswith(
        "bubblewrap cannot create a sandbox here (bwrap: No permissions to creating new namespace)"
    )
    assert "apt-get install bubblewrap" in str(info.value)
    check_sandbox.cache_clear()


def test_sandbox_memory_limit():
    from rlhfkit.agents.sandbox import run_sandboxed

    env = load_environment("os", memory_mb=64)
    env.reset(os_tasks.make_tasks("test")[0])
    grow = "x=$(head -c {} /dev/zero | tr '\\0' a); echo length ${{#x}}"
    assert observe(env, "bash", {"command": grow.format(10_000_000)}) == "length 10000000"
    content = observe(env, "bash", {"command": grow.format(100_000_000)})
    assert "cannot allocate" in content and "length" not in content
    result = run_sandboxed("echo $HOME; pwd; ls", env.workdir, timeout=5)
    assert result.exit_code == 0 and result.output.split("\n")[:2] == ["/home/agent", "/home/agent"]
    env.close()


def test_os_gold_commands_pass_and_wrong_answers_fail(os_env):
    test = os_tasks.make_tasks("test")
    by_type = {}
    for task in test:
        by_type.setdefault(task.data["type"], task)
    assert len(by_type) == len(os_tasks.TYPES)  # every kind of task is in the test split
    for kind, task in by_type.items():
        os_env.reset(task)
        output = observe(os_env, "bash", {"command": task.data["command"]})
        assert os_env.step(answer(output)).reward == 1.0, (kind, output, task.data["answer"])
        os_env.reset(task)
        if task.data["kind"] == "number":
            wrong = str(int(task.data["answer"]) + 1)
        elif task.data["kind"] == "text":
            wrong = next(c for c in task.data["choices"] if c != task.data["answer"])
        else:  # the copy job: copying every file is wrong
            folder = task.prompt.split("of the folder ")[1].split()[0]
            observe(os_env, "bash", {"command": f"mkdir archive && cp {folder}/* archive/"})
            wrong = "done"
        assert os_env.step(answer(wrong)).reward == 0.0, (kind, wrong)


def test_os_wrong_command_gives_a_wrong_answer(os_env):
    task = next(t for t in os_tasks.make_tasks("test") if t.data["type"] == "count_ext")
    os_env.reset(task)
    ext = task.prompt.split("extension ")[1].split()[0]
    root = task.prompt.split("in the folder ")[1].split(",")[0]
    shallow = observe(os_env, "bash", {"command": f"find {root} -maxdepth 1 -name '*{ext}' | wc -l"})
    assert os_env.step(answer(shallow)).reward == 0.0  # misses the subfolders


def test_sandbox_escapes_fail(os_env, tmp_path):
    task = os_tasks.make_tasks("test")[0]
    marker = tmp_path / "host-file.txt"
    marker.write_text("host\n")
    os_env.reset(task)
    host_home, host_cwd = Path.home() / "rlhfkit-escape", Path.cwd() / "rlhfkit-escape"
    attempts = {
        "echo x > /etc/escape": "Read-only file system",
        "echo x > /usr/escape": "Read-only file system",
        "echo x > /escape": "Read-only file system",
        f"echo x > {host_home}": "No such file or directory",
        f"echo x > {host_cwd}": "No such file or directory",
        f"cat {marker}; rm -f {marker}": "No such file or directory",
        "exec 3<>/dev/tcp/1.1.1.1/80 && echo connected": "Network is unreachable",
        "getent hosts example.com; echo rc=$?": "rc=2",
    }
    for command, expected in attempts.items():
        content = observe(os_env, "bash", {"command": command})
        assert expected in content and "connected\n" not in content, (command, content)
    observe(os_env, "bash", {"command": "echo x > /tmp/escape && echo x > $HOME/inside.txt"})
    assert (
        not Path("/etc/escape").exists() and not Path("/escape").exists() and not Path("/tmp/escape").exists()
    )
    assert not host_home.exists() and not host_cwd.exists()
    assert marker.read_text() == "host\n"
    assert (os_env.workdir / "inside.txt").read_text() == "x\n"  # the working directory is the writable place


def test_sandbox_python_has_no_network(os_env):
    os_env.reset(os_tasks.make_tasks("test")[0])
    script = "import socket\ns = socket.socket()\ns.settimeout(2)\n"
    script += "s.connect(('1.1.1.1', 80))\nprint('connected')\n"
    (os_env.workdir / "net.py").write_text(script)
    content = observe(os_env, "bash", {"command": "command -v python3 >/dev/null || exit 0; python3 net.py"})
    assert "connected" not in content.replace("not connected", "")


@pytest.mark.slow
def test_sandbox_limits_time_output_and_file_size():
    env = load_environment("os", command_timeout=1, max_output_chars=500)
    env.reset(os_tasks.make_tasks("test")[0])
    start = time.monotonic()
    content = observe(env, "bash", {"command": "(sleep 123 &); sleep 100"})
    assert time.monotonic() - start < 5
    assert content == "error: the command timed out after 1 s and was killed"
    time.sleep(0.3)
    left = []
    for proc in Path("/proc").iterdir():
        try:
            left.append((proc / "cmdline").read_bytes())
        except OSError:
            continue
    assert b"sleep\x00123\x00" not in left and b"sleep\x00100\x00" not in left  # nothing survives
    content = observe(env, "bash", {"command": "yes | head -c 100000"})
    assert content.endswith("\n... [output truncated]") and len(content) <= 500
    observe(env, "bash", {"command": "head -c 40000000 /dev/zero > big"})
    assert os.path.getsize(env.workdir / "big") == 16 * 1024 * 1024
    assert observe(env, "bash", {"command": "exit 3"}) == "(exit code 3)"
    env.close()


def test_os_splits_are_deterministic_and_disjoint():
    train, test = os_tasks.make_tasks("train"), os_tasks.make_tasks("test")
    assert (len(train), len(test)) == (300, 60)
    key = lambda t: json.dumps([t.prompt, t.data["files"]], sort_keys=True)  # noqa: E731
    assert not {key(t) for t in train} & {key(t) for t in test}
    os_tasks.make_tasks.cache_clear()
    assert os_tasks.make_tasks("test") == test


# ------------------------------------------------------------------------------------ registry, demos


def test_load_environment_by_name_or_spec():
    assert isinstance(load_environment("calc"), CalcEnvironment)
    assert load_environment("db", query_timeout=1.5).query_timeout == 1.5
    assert isinstance(load_environment("rlhfkit.agents.calc:CalcEnvironment"), CalcEnvironment)
    known = "calc, db, os, commons, support"
    with pytest.raises(
        ConfigError, match=rf"^environment 'chess' is unknown: use one of {known}, or module:Class"
    ):
        load_environment("chess")
    with pytest.raises(ConfigError, match=r"is not a subclass of rlhfkit\.agents\.env\.Environment$"):
        load_environment("rlhfkit.agents.calc:calculator")
    with pytest.raises(ConfigError, match=r"^environment 'calc': bad env_settings \['colour'\]"):
        load_environment("calc", colour="red")


@pytest.mark.parametrize("name", ["calc", "db"])
def test_every_bundled_demonstration_replays_exactly(name):
    from rlhfkit.data.records import load_sft

    env = load_environment(name)
    train = {t.id: t for t in env.tasks("train")}
    key = lambda t: json.dumps([t.prompt, t.data.get("tables")])  # noqa: E731 - db tasks share questions
    test_keys = {key(t) for t in env.tasks("test")}
    lines = demos_path(name).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 300
    for line in lines:
        record = json.loads(line)
        task = train[record["task_id"]]  # train tasks only
        assert key(task) not in test_keys
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
        assert record["messages"][3]["content"].startswith("<tool_response>\n")
        rendered, reward = replay(env, task, record)
        assert rendered == record["messages"] and reward == 1.0, record["task_id"]
    assert len(load_sft(demos_path(name))) == 300  # SFT reads the file as it is
    first = json.loads(lines[0])
    assert [len(r["messages"]) for r in turn_records(first)] == [3, 5]
