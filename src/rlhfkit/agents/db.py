"""`db`: questions about one or two small SQLite tables, answered with an `sql` tool (AgentBench's DB task).

Each task carries its tables (columns and at most 15 rows, `agents.db_tasks`) and the gold SQL; `reset`
writes them to a fresh database file for the episode, which the tool opens read-only four ways over:
the `file:...?mode=ro` URI, `PRAGMA query_only=ON`, an authorizer that allows only reading (SELECT, reads,
functions but `load_extension`, recursive CTEs, and the schema pragmas `table_info` and friends: no ATTACH,
no write, no other PRAGMA), and extension loading switched off. A statement runs at most `query_timeout`
seconds (SQLite's progress handler interrupts it) and its result is shown as a text table of at most
`max_rows` rows.

The answer is checked against the gold SQL's result: a number within 1e-4 relative (or 0.01), a name
case-insensitively among the values the question could name, a list as a set of those values in any order.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhfkit.agents.answers import last_number, named_values, normalize, numbers_match
from rlhfkit.agents.db_tasks import make_tasks, write_database
from rlhfkit.agents.env import Message, Split, Task
from rlhfkit.agents.tools import ToolEnvironment
from rlhfkit.errors import RlhfkitError

# pragmas that only read the schema; any other pragma (and any pragma with "=") is refused
READ_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "foreign_key_list"}
ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE}


def authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
    """SQLite's authorizer: reading is allowed, everything else (writes, ATTACH, pragmas that set) denied."""
    if action in ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() == "load_extension" else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if value == value else "NaN"
    return str(value)


class ReadOnlyDatabase:
    """A database file opened for reading only, with a time limit per statement (see the module docstring)."""

    def __init__(self, path: str | Path, query_timeout: float = 2.0, max_rows: int = 30) -> None:
        self.query_timeout, self.max_rows = query_timeout, max_rows
        self.deadline = float("inf")
        self.conn = sqlite3.connect(
            f"{Path(path).resolve().as_uri()}?mode=ro",
            uri=True,
            check_same_thread=False,
            isolation_level=None,
        )
        self.conn.execute("PRAGMA query_only=ON")
        if hasattr(self.conn, "enable_load_extension"):
            self.conn.enable_load_extension(False)
        if sys.version_info < (3, 11):  # Connection.setlimit and its SQLITE_LIMIT_* constants are 3.11+
            self.conn.close()
            raise RlhfkitError("the `db` environment needs Python 3.11 or later (sqlite3 size limits)")
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)  # no giant strings or blobs
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self.conn.set_authorizer(authorize)
        self.conn.set_progress_handler(self.interrupt, 1000)

    def interrupt(self) -> int:
        return int(time.monotonic() > self.deadline)

    def query(self, sql: str) -> str:
        """The result of one statement as a text table, or an "error: ..." line."""
        self.deadline = time.monotonic() + self.query_timeout
        try:
            cursor = self.conn.execute(sql)
            rows = cursor.fetchmany(self.max_rows + 1)
            columns = [d[0] for d in cursor.description or []]
        except sqlite3.Error as exc:
            message = str(exc)
            if "interrupted" in message:
                return f"error: the query ran longer than {self.query_timeout:g} s and was stopped"
            if "not authorized" in message or "prohibited" in message or "readonly" in message:
                return f"error: {message} (the database is read-only: only SELECT queries are allowed)"
            return f"error: {message}"
        finally:
            self.deadline = float("inf")
        if not columns:
            return "(no result)"
        more = len(rows) > self.max_rows
        lines = [" | ".join(columns)] + [" | ".join(cell(v) for v in row) for row in rows[: self.max_rows]]
        if not rows:
            lines.append("(no rows)")
        if more:
            lines.append(f"... (more than {self.max_rows} rows; narrow the query)")
        return "\n".join(lines)

    def close(self) -> None:
        self.conn.close()


class DBEnvironment(ToolEnvironment):
    """Questions over SQLite tables with a read-only `sql` tool (see the module docstring)."""

    name = "db"

    def __init__(
        self,
        tool_timeout: float | None = None,
        max_output_chars: int = 2000,
        query_timeout: float = 2.0,
        max_rows: int = 30,
    ) -> None:
        self.query_timeout, self.max_rows = float(query_timeout), int(max_rows)
        self.database: ReadOnlyDatabase | None = None
        self.workdir: str | None = None
        super().__init__(tool_timeout, max_output_chars)

    def tools(self) -> list[Callable[..., Any]]:
        return [self.sql]

    def sql(self, query: str) -> str:
        """Run one read-only SQL query (SQLite) on the task's database and return the result table.

        Args:
            query: A single SELECT statement, e.g. "SELECT name, salary FROM employees WHERE city = 'Lyon'".
        """
        if self.database is None:
            return "error: no database is open (the episode has not started)"
        return self.database.query(query)

    def tasks(self, split: Split) -> list[Task]:
        return list(make_tasks(split))

    def reset(self, task: Task) -> list[Message]:
        self.close()
        self.workdir = tempfile.mkdtemp(prefix="rlhfkit-db-")
        path = Path(self.workdir) / "task.sqlite"
        write_database(path, task.data["tables"])
        self.database = ReadOnlyDatabase(path, self.query_timeout, self.max_rows)
        return super().reset(task)

    def instructions(self, task: Task) -> str:
        return (
            "You answer questions about a SQLite database. Use the sql tool to run SELECT queries; the "
            "database is read-only. When you know the answer, reply without a tool call and give only the "
            "answer: a number, a name, or for a list the values separated by commas."
        )

    def check(self, task: Task, answer: str) -> float:
        return float(answer_matches(task.data, answer))

    def close(self) -> None:
        if self.database is not None:
            self.database.close()
            self.database = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def answer_matches(data: dict[str, Any], answer: str) -> bool:
    """Whether `answer` gives the task's gold result (kind "number", "text" or "list")."""
    gold = data["answer"]
    if data["kind"] == "number":
        return numbers_match(last_number(answer), float(gold), rel_tol=1e-4, abs_tol=0.01)
    choices = data["choices"]
    if data["kind"] == "text":
        return normalize(answer) == normalize(gold) or named_values(answer, choices) == {normalize(gold)}
    return named_values(answer, choices) == {normalize(g) for g in gold}
