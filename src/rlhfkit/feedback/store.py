"""The labelling project in one SQLite file: prompts, answers, people, sessions, assignments, labels.

Durability. The database runs in WAL mode with ``synchronous=FULL``: every COMMIT fsyncs the WAL before it
returns, and the web app commits a label before it sends the response. So a label the browser was told
about survives a killed server *and* a power cut. (``synchronous=NORMAL`` in WAL mode would survive a
killed process, not a power cut; one fsync per human label costs nothing, so we pay for FULL.)

Concurrency. Each request opens its own connection; every write is one ``BEGIN IMMEDIATE`` transaction,
which takes the write lock at the start, so two submissions for the same item cannot interleave their
read-check-insert (the other waits, up to ``busy_timeout``). Readers never block in WAL mode.

Idempotency. A label is unique per (annotator, item) and per (annotator, submission id). Replaying a
submission (double click, retried request) finds the stored row with the same submission id and reports
success without writing; a *different* submission for an already-labelled item is refused (first wins).

Items are of two kinds: K answers to a prompt (table ``answers``), or K agent episodes of one task (tables
``episode_items`` and ``episodes``, written and read by ``feedback.episodes``). A label holds the rank level
of each answer or episode and, for episodes, the assistant turns flagged as where each one went wrong.

Upgrades. A database made before episodes existed lacks their tables and the labels' ``flags`` column;
``open_db`` adds them in place (``upgrade``), once. Both are additions an older reader ignores.

Assignment. An annotator asks for work and gets, in id order, an item they have not labelled whose
*active* count is below the overlap N: labels that count (rankings and "all bad"; a skip does not) plus
assignments still open and younger than the lease. So every item ends with at least N labels, unless
annotators run out; an assignment abandoned for longer than the lease is handed to someone else, and a
late submission of it is still accepted (the item then has N + 1 labels).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from rlhfkit.errors import RlhfkitError
from rlhfkit.feedback.security import dummy_verify, hash_password, new_token, token_hash, verify_password

ROLES = ("admin", "annotator")
KINDS = ("rank", "all_bad", "skip")
SESSION_SECONDS = 12 * 3600
DEFAULT_LEASE_SECONDS = 1800
DEFAULT_GUIDELINES = (
    "Rank the answers from best to worst for the prompt shown. A good answer is correct, helpful, "
    "honest and harmless, and says it plainly. Give answers of the same quality the same rank (a tie). "
    'If every answer is unacceptable, choose "All bad"; if you cannot judge the prompt, skip it.'
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('secret', lower(hex(randomblob(32))));
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL  -- JSON: a string or a list of messages, as in the prompts file
);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    position INTEGER NOT NULL,  -- index in the exported "completions"
    text TEXT NOT NULL,
    model TEXT NOT NULL,  -- who wrote it: never shown to annotators
    UNIQUE (item_id, position)
);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'annotator')),
    password_hash TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,  -- SHA-256 of the cookie value
    user_id INTEGER NOT NULL REFERENCES users(id),
    csrf TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    user_id INTEGER NOT NULL REFERENCES users(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    assigned REAL NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, item_id)
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    submission_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('rank', 'all_bad', 'skip')),
    ranks TEXT,  -- JSON: rank level per answer position, 0 = best, ties share a level; only for 'rank'
    created REAL NOT NULL,
    flags TEXT,  -- JSON: per episode position, its flagged assistant turns; NULL for answers and skips
    UNIQUE (user_id, item_id),
    UNIQUE (user_id, submission_id)
);
CREATE INDEX IF NOT EXISTS labels_item ON labels (item_id);
CREATE INDEX IF NOT EXISTS assignments_item ON assignments (item_id, done);
"""

EPISODE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS episode_items (
    item_id INTEGER PRIMARY KEY REFERENCES items(id),  -- items.prompt holds the task's opening messages
    tools TEXT,  -- JSON: the tool schemas the agent had, or NULL
    task_id TEXT NOT NULL,
    env TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS episodes (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    position INTEGER NOT NULL,  -- index in the exported "episodes"
    messages TEXT NOT NULL,  -- JSON: the messages after the prompt (assistant, tool and user turns)
    tokens TEXT,  -- JSON: the sampler's prompt_ids, completion_ids, loss_mask; NULL from an endpoint
    outcome TEXT NOT NULL,  -- JSON: the environment's return, the end reason, the turns
    model TEXT NOT NULL,  -- who acted: never shown to annotators
    UNIQUE (item_id, position)
)""",
)


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str


@dataclass(frozen=True)
class Answer:
    id: int
    position: int
    text: str
    model: str


@dataclass(frozen=True)
class Item:
    id: int
    prompt: Any  # a string or a list of messages
    answers: tuple[Answer, ...]  # in position order


@dataclass(frozen=True)
class Label:
    item_id: int
    user: str
    kind: str
    ranks: tuple[int, ...] | None  # level per answer position; None unless kind == "rank"
    flags: tuple[tuple[int, ...], ...] | None = None  # per episode position, its flagged assistant turns


class Outcome(Enum):
    """What a submission did."""

    STORED = "stored"
    REPLAYED = "replayed"  # the same submission id was stored before: nothing written, still a success
    CONFLICT = "conflict"  # the item was already labelled by this annotator with another submission
    NOT_ASSIGNED = "not_assigned"


# ------------------------------------------------------------------------------------ connections
def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (explicit transactions), ``synchronous=FULL``, 30 s busy wait."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def open_db(path: str | Path, create: bool = False) -> sqlite3.Connection:
    """Open a project database, creating the schema when ``create``; a missing file is a user error."""
    if not create and not Path(path).is_file():
        raise RlhfkitError(f"{path}: no such labelling database (create it with `rlhfkit feedback prepare`)")
    try:
        conn = connect(path)
    except sqlite3.DatabaseError as exc:
        raise RlhfkitError(f"{path}: not a labelling database ({exc})") from None
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file once set
        if create:
            conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")  # idempotent: IF NOT EXISTS
        if get_meta(conn, "secret") is None:
            raise sqlite3.DatabaseError("no project metadata")
        upgrade(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise RlhfkitError(f"{path}: not a labelling database ({exc})") from None
    return conn


def upgrade(conn: sqlite3.Connection) -> None:
    """Add the episode tables and the labels' ``flags`` column to a database made without them (checked
    again under the write lock, so two processes opening one old file upgrade it once)."""

    def current() -> bool:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {"episode_items", "episodes"} <= tables and "flags" in label_columns()

    def label_columns() -> set[str]:
        return {r[1] for r in conn.execute("PRAGMA table_info(labels)")}

    if current():
        return
    with transaction(conn):
        for statement in EPISODE_SCHEMA:
            conn.execute(statement)
        if "flags" not in label_columns():
            conn.execute("ALTER TABLE labels ADD COLUMN flags TEXT")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction that holds the write lock from its first statement (``BEGIN IMMEDIATE``)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# --------------------------------------------------------------------------------------- project
def get_meta(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    with transaction(conn):
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def overlap(conn: sqlite3.Connection) -> int:
    """N: how many annotators label each item."""
    return int(get_meta(conn, "overlap", "1") or 1)


def create_project(
    conn: sqlite3.Connection,
    items: Sequence[tuple[Any, Sequence[tuple[str, str]]]],
    n_overlap: int,
    guidelines: str = DEFAULT_GUIDELINES,
) -> None:
    """Store the items, each ``(prompt, [(answer text, model), ...])``, in one transaction.

    A database that already holds items is refused: its labels refer to those items.
    """
    with transaction(conn):
        start_project(conn, n_overlap, guidelines)
        for prompt, answers in items:
            item_id = conn.execute("INSERT INTO items (prompt) VALUES (?)", (json.dumps(prompt),)).lastrowid
            conn.executemany(
                "INSERT INTO answers (item_id, position, text, model) VALUES (?, ?, ?, ?)",
                [(item_id, pos, text, model) for pos, (text, model) in enumerate(answers)],
            )


def start_project(conn: sqlite3.Connection, n_overlap: int, guidelines: str) -> None:
    """Inside a project's first write transaction: refuse a database that already holds items (its labels
    refer to them), and record the overlap and guidelines."""
    if n_overlap < 1:
        raise RlhfkitError(f"overlap must be at least 1, got {n_overlap}")
    if conn.execute("SELECT count(*) FROM items").fetchone()[0]:
        raise RlhfkitError("this database already holds a labelling project; use a new --db file")
    conn.executemany(
        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
        [("overlap", str(n_overlap)), ("guidelines", guidelines), ("created", str(time.time()))],
    )


def load_item(conn: sqlite3.Connection, item_id: int) -> Item | None:
    row = conn.execute("SELECT prompt FROM items WHERE id = ?", (item_id,)).fetchone()
    if row is None:
        return None
    answers = conn.execute(
        "SELECT id, position, text, model FROM answers WHERE item_id = ? ORDER BY position", (item_id,)
    ).fetchall()
    return Item(item_id, json.loads(row[0]), tuple(Answer(*a) for a in answers))


def all_items(conn: sqlite3.Connection) -> dict[int, Item]:
    ids = [r[0] for r in conn.execute("SELECT id FROM items ORDER BY id")]
    return {i: item for i in ids if (item := load_item(conn, i)) is not None}


# ------------------------------------------------------------------------------------ people
def add_user(conn: sqlite3.Connection, name: str, role: str, password: str) -> bool:
    """Create a user, or set a new password and role for an existing name; True if the user is new."""
    name = name.strip()
    if not name or len(name) > 64:
        raise RlhfkitError("a user name must have 1 to 64 characters")
    if role not in ROLES:
        raise RlhfkitError(f"role must be one of {', '.join(ROLES)}, got '{role}'")
    if len(password) < 8:
        raise RlhfkitError("a password must have at least 8 characters")
    hashed = hash_password(password)  # slow: outside the write lock
    with transaction(conn):
        updated = conn.execute(
            "UPDATE users SET role = ?, password_hash = ? WHERE name = ?", (role, hashed, name)
        ).rowcount
        if updated:
            conn.execute(
                "DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE name = ?)", (name,)
            )
            return False
        conn.execute(
            "INSERT INTO users (name, role, password_hash, created) VALUES (?, ?, ?, ?)",
            (name, role, hashed, time.time()),
        )
    return True


def authenticate(conn: sqlite3.Connection, name: str, password: str) -> User | None:
    row = conn.execute("SELECT id, name, role, password_hash FROM users WHERE name = ?", (name,)).fetchone()
    if row is None:
        dummy_verify(password)
        return None
    return User(row[0], row[1], row[2]) if verify_password(password, row[3]) else None


def users(conn: sqlite3.Connection) -> list[User]:
    return [User(*r) for r in conn.execute("SELECT id, name, role FROM users ORDER BY name")]


def create_session(conn: sqlite3.Connection, user: User) -> tuple[str, str]:
    """A new session for ``user``: (cookie token, CSRF token). Expired sessions are swept on the way."""
    token, csrf, now = new_token(), new_token(), time.time()
    with transaction(conn):
        conn.execute("DELETE FROM sessions WHERE expires < ?", (now,))
        conn.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?)",
            (token_hash(token), user.id, csrf, now + SESSION_SECONDS),
        )
    return token, csrf


def session_user(conn: sqlite3.Connection, token: str | None) -> tuple[User, str] | None:
    """The user and CSRF token of a live session, or None."""
    if not token:
        return None
    row = conn.execute(
        "SELECT u.id, u.name, u.role, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id "
        "WHERE s.token_hash = ? AND s.expires > ?",
        (token_hash(token), time.time()),
    ).fetchone()
    return (User(row[0], row[1], row[2]), row[3]) if row else None


def end_session(conn: sqlite3.Connection, token: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash(token),))


# ------------------------------------------------------------------------------------ labelling
def next_item(conn: sqlite3.Connection, user_id: int, lease: float = DEFAULT_LEASE_SECONDS) -> int | None:
    """The item this annotator should label next (their open assignment first), assigning a new one if
    needed; None when nothing is left for them."""
    with transaction(conn):
        row = conn.execute(
            "SELECT item_id FROM assignments WHERE user_id = ? AND done = 0 "
            "ORDER BY assigned, item_id LIMIT 1",
            (user_id,),
        ).fetchone()
        if row:
            return int(row[0])
        now = time.time()
        row = conn.execute(
            """SELECT i.id FROM items i
               WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.user_id = :user)
                 AND (SELECT count(*) FROM labels l WHERE l.item_id = i.id AND l.kind != 'skip')
                   + (SELECT count(*) FROM assignments a
                      WHERE a.item_id = i.id AND a.done = 0 AND a.assigned > :fresh) < :overlap
               ORDER BY i.id LIMIT 1""",
            {"user": user_id, "fresh": now - lease, "overlap": overlap(conn)},
        ).fetchone()
        if row is None:
            return None
        conn.execute(
            "INSERT INTO assignments (user_id, item_id, assigned) VALUES (?, ?, ?)", (user_id, row[0], now)
        )
        return int(row[0])


def is_assigned(conn: sqlite3.Connection, user_id: int, item_id: int) -> bool:
    row = conn.execute("SELECT 1 FROM assignments WHERE user_id = ? AND item_id = ?", (user_id, item_id))
    return row.fetchone() is not None


def submit(
    conn: sqlite3.Connection,
    user_id: int,
    item_id: int,
    submission_id: str,
    kind: str,
    ranks: Sequence[int] | None = None,
    flags: Sequence[Sequence[int]] | None = None,
) -> Outcome:
    """Store one label in one transaction (see the module docstring for replays and conflicts). ``flags``
    (episode items: the flagged assistant turns of each episode position) go with a ranking or "all bad"."""
    if kind not in KINDS:
        raise ValueError(f"unknown label kind {kind!r}")
    if (ranks is not None) != (kind == "rank"):
        raise ValueError("ranks are given exactly for kind 'rank'")
    if flags is not None and kind == "skip":
        raise ValueError("a skip flags no turn")
    flags_json = None if flags is None else json.dumps([sorted(set(f)) for f in flags])
    with transaction(conn):
        stored = conn.execute(
            "SELECT submission_id FROM labels WHERE user_id = ? AND (item_id = ? OR submission_id = ?)",
            (user_id, item_id, submission_id),
        ).fetchall()
        if stored:
            return Outcome.REPLAYED if [r[0] for r in stored] == [submission_id] else Outcome.CONFLICT
        if not is_assigned(conn, user_id, item_id):
            return Outcome.NOT_ASSIGNED
        conn.execute(
            "INSERT INTO labels (user_id, item_id, submission_id, kind, ranks, created, flags) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (user_id, item_id, submission_id, kind, json.dumps(list(ranks)) if ranks else None, time.time(),
             flags_json),
        )  # fmt: skip
        conn.execute("UPDATE assignments SET done = 1 WHERE user_id = ? AND item_id = ?", (user_id, item_id))
    return Outcome.STORED


def progress(conn: sqlite3.Connection, user_id: int, lease: float = DEFAULT_LEASE_SECONDS) -> tuple[int, int]:
    """(done, remaining) for one annotator: items they labelled or skipped, and items still open to them."""
    done = conn.execute("SELECT count(*) FROM labels WHERE user_id = ?", (user_id,)).fetchone()[0]
    remaining = conn.execute(
        """SELECT count(*) FROM items i
           WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.user_id = :user)
             AND (EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.user_id = :user)
                  OR (SELECT count(*) FROM labels l WHERE l.item_id = i.id AND l.kind != 'skip')
                   + (SELECT count(*) FROM assignments a
                      WHERE a.item_id = i.id AND a.done = 0 AND a.assigned > :fresh) < :overlap)""",
        {"user": user_id, "fresh": time.time() - lease, "overlap": overlap(conn)},
    ).fetchone()[0]
    return int(done), int(remaining)


def labels(conn: sqlite3.Connection, kinds: Sequence[str] = KINDS) -> list[Label]:
    """Every stored label of the given kinds, in item then annotator order."""
    marks = ", ".join("?" for _ in kinds)
    rows = conn.execute(
        f"SELECT l.item_id, u.name, l.kind, l.ranks, l.flags FROM labels l JOIN users u ON u.id = l.user_id "
        f"WHERE l.kind IN ({marks}) ORDER BY l.item_id, u.name",
        tuple(kinds),
    )
    return [
        Label(i, name, kind, tuple(json.loads(r)) if r else None,
              tuple(tuple(turns) for turns in json.loads(f)) if f else None)
        for i, name, kind, r, f in rows
    ]  # fmt: skip


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Project totals for the admin page."""
    out = {kind: 0 for kind in KINDS}
    out.update(dict(conn.execute("SELECT kind, count(*) FROM labels GROUP BY kind").fetchall()))
    out["items"] = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    out["complete"] = conn.execute(
        "SELECT count(*) FROM (SELECT item_id FROM labels WHERE kind != 'skip' GROUP BY item_id "
        "HAVING count(*) >= ?)",
        (overlap(conn),),
    ).fetchone()[0]
    return out


def per_user_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Labels of each kind per user name."""
    out: dict[str, dict[str, int]] = {u.name: dict.fromkeys(KINDS, 0) for u in users(conn)}
    for name, kind, n in conn.execute(
        "SELECT u.name, l.kind, count(*) FROM labels l JOIN users u ON u.id = l.user_id "
        "GROUP BY u.name, l.kind"
    ):
        out[name][kind] = n
    return out
