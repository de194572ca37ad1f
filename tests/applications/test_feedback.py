"""The labelling project without a browser: storage rules, export formats, prepare on the tiny model, the
CLI, and a reward model trained on exported labels."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import write_jsonl
from tests.helpers import make_project

from rlhfkit.data.records import PreferenceRecord, RankingRecord, load_preferences
from rlhfkit.errors import RlhfkitError
from rlhfkit.feedback import store
from rlhfkit.feedback.export import export, export_rows, ranking_json
from rlhfkit.feedback.prepare import PrepareConfig, run_prepare
from rlhfkit.feedback.security import hash_password, same_secret, verify_password
from rlhfkit.feedback.store import Outcome
from rlhfkit.fileio import write_atomic
from rlhfkit.rollout import SamplingConfig

CLI = [sys.executable, "-m", "rlhfkit.cli", "feedback"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------ security
def test_password_hashes_are_salted_and_checked():
    first, second = hash_password("hunter2hunter2"), hash_password("hunter2hunter2")
    assert first != second and first.startswith("scrypt$16384$8$1$")
    assert verify_password("hunter2hunter2", first) and verify_password("hunter2hunter2", second)
    assert not verify_password("hunter2hunter3", first)
    assert not verify_password("hunter2hunter2", "scrypt$garbage") and not verify_password("x", "")
    assert same_secret("abc", "abc") and not same_secret("abc", "abd") and not same_secret("", "")


# ------------------------------------------------------------------------------------------ store
def test_each_item_gets_n_annotators_and_leases_expire(tmp_path: Path):
    conn = make_project(tmp_path / "p.sqlite", [(f"P{i}", ["a", "b"]) for i in range(2)], 2, {})
    for name in ("u1", "u2", "u3"):
        conn.execute(
            "INSERT INTO users (name, role, password_hash, created) VALUES (?, 'annotator', '-', 0)", (name,)
        )
    u1, u2, u3 = (u.id for u in store.users(conn))
    assert store.next_item(conn, u1) == 1
    assert store.next_item(conn, u1) == 1  # the open assignment again, not a new one
    assert store.next_item(conn, u2) == 1  # 1 open assignment < N = 2
    assert store.next_item(conn, u3) == 2  # item 1 has N active assignments
    assert store.submit(conn, u1, 1, "s-u1-1", "skip") is Outcome.STORED
    assert store.next_item(conn, u1) == 2  # a skip frees the slot of item 1, and u1 moves on
    assert store.next_item(conn, u3) == 2
    assert store.submit(conn, u3, 2, "s-u3-2", "rank", [0, 1]) is Outcome.STORED
    assert store.next_item(conn, u3) == 1  # item 1: u2 open + u1 skipped -> one slot left
    assert store.submit(conn, u2, 1, "s-u2-1", "all_bad") is Outcome.STORED
    assert store.submit(conn, u3, 1, "s-u3-1", "rank", [1, 0]) is Outcome.STORED
    assert store.next_item(conn, u3) is None
    assert store.progress(conn, u3) == (2, 0)
    assert store.progress(conn, u1) == (1, 1)  # item 2 is still assigned to u1
    # u1 abandons item 2; once the lease is over, the slot goes to someone else
    conn.execute("INSERT INTO users (name, role, password_hash, created) VALUES ('u4', 'annotator', '-', 0)")
    u4 = store.users(conn)[-1].id
    assert store.next_item(conn, u4) is None
    assert store.next_item(conn, u4, lease=0.0) == 2
    assert store.counts(conn) == {"rank": 2, "all_bad": 1, "skip": 1, "items": 2, "complete": 1}


def test_submissions_are_idempotent_and_first_wins(tmp_path: Path):
    conn = make_project(
        tmp_path / "p.sqlite", [("P", ["a", "b", "c"])], 1, {"ann": "annotator", "bob": "annotator"}
    )
    ann, bob = (u.id for u in store.users(conn))
    assert store.submit(conn, ann, 1, "early-submission", "rank", [0, 1, 2]) is Outcome.NOT_ASSIGNED
    store.next_item(conn, ann)
    assert store.submit(conn, ann, 1, "sub-1", "rank", [2, 0, 1]) is Outcome.STORED
    assert store.submit(conn, ann, 1, "sub-1", "rank", [2, 0, 1]) is Outcome.REPLAYED
    assert store.submit(conn, ann, 1, "sub-2", "rank", [0, 1, 2]) is Outcome.CONFLICT
    assert store.submit(conn, bob, 1, "sub-1", "rank", [0, 1, 2]) is Outcome.NOT_ASSIGNED
    assert [(x.user, x.ranks) for x in store.labels(conn)] == [("ann", (2, 0, 1))]
    with pytest.raises(ValueError):
        store.submit(conn, ann, 1, "sub-3", "skip", [0, 1, 2])


def test_database_settings_and_user_errors(tmp_path: Path):
    db = tmp_path / "p.sqlite"
    conn = make_project(db, [("P", ["a", "b"])], 1, {"root": "admin"})
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(RlhfkitError, match="already holds a labelling project"):
        store.create_project(conn, [("Q", [("a", "m"), ("b", "m")])], 1)
    with pytest.raises(RlhfkitError, match="at least 8 characters"):
        store.add_user(conn, "short", "annotator", "1234567")
    with pytest.raises(RlhfkitError, match="role must be one of"):
        store.add_user(conn, "x", "owner", "12345678")
    assert store.authenticate(conn, "root", "correct horse battery") is not None
    assert store.add_user(conn, "root", "annotator", "a new password") is False  # reset password and role
    assert store.authenticate(conn, "root", "correct horse battery") is None
    assert store.authenticate(conn, "root", "a new password") == store.User(1, "root", "annotator")
    assert store.authenticate(conn, "nobody", "a new password") is None
    (tmp_path / "junk.sqlite").write_text("not a database at all, just text" * 10)
    for bad in (tmp_path / "missing.sqlite", tmp_path / "junk.sqlite"):
        with pytest.raises(RlhfkitError, match="labelling database"):
            store.open_db(bad)


# ------------------------------------------------------------------------------------------ export
def labelled_project(tmp_path: Path) -> Path:
    """Two items (a string prompt, a chat prompt): rankings by two annotators (one tie), an all-bad, skips."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    db = tmp_path / "p.sqlite"
    users = {"ann": "annotator", "bob": "annotator", "cat": "annotator"}
    conn = make_project(
        db, [("Name a colour.", ["red", "blue", "green"]), (chat, ["hello", "hey"])], 3, users
    )
    ann, bob, cat = (u.id for u in store.users(conn))
    for user in (ann, bob, cat):
        while (item := store.next_item(conn, user)) is not None:
            ranks = {(ann, 1): [1, 0, 1], (bob, 1): [0, 1, 2], (ann, 2): [1, 0]}.get((user, item))
            kind = "rank" if ranks else ("all_bad" if user == bob else "skip")
            store.submit(conn, user, item, f"{user}-{item}", kind, ranks)
    conn.close()
    return db


def test_exports_load_as_the_documented_records(tmp_path: Path):
    db = labelled_project(tmp_path)
    conn = store.open_db(db)
    assert ranking_json((1, 0, 1)) == [1, [0, 2]]
    out = tmp_path / "out" / "rankings.jsonl"
    assert export(conn, out, "rankings") == {"rows": 3, "all_bad": 1, "skip": 2}
    rankings = load_preferences(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["ranking"] for r in rows] == [[1, [0, 2]], [0, 1, 2], [1, 0]]
    assert [r["annotator"] for r in rows] == ["ann", "bob", "ann"]
    assert all(isinstance(r, RankingRecord) for r in rankings)
    assert rankings[0].ranks == (1, 0, 1) and rankings[0].completions == ("red", "blue", "green")
    assert rankings[2].completions == (
        [{"role": "assistant", "content": "hello"}],
        [{"role": "assistant", "content": "hey"}],
    )
    assert rows[0]["models"] == ["model-0", "model-1", "model-0"]

    pairs_out = tmp_path / "pairs.jsonl"
    assert export(conn, pairs_out, "pairs")["rows"] == 2 + 3 + 1  # the tie red = green gives no pair
    pairs = load_preferences(pairs_out)
    assert all(isinstance(p, PreferenceRecord) for p in pairs)
    got = [(p.chosen, p.rejected) for p in pairs]
    assert got[:5] == [
        ("blue", "red"),
        ("blue", "green"),
        ("red", "blue"),
        ("red", "green"),
        ("blue", "green"),
    ]
    assert got[5] == ([{"role": "assistant", "content": "hey"}], [{"role": "assistant", "content": "hello"}])
    assert pairs[5].prompt[0]["role"] == "system"
    assert not list(tmp_path.glob("**/.*.tmp-*"))  # no temporary file left behind


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "x.jsonl"
    write_atomic(target, "old\n")

    def disk_full(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the temporary file is written
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


# ------------------------------------------------------------------------------------------ prepare
@pytest.mark.slow
def test_prepare_on_the_tiny_model(tiny_model: Path, tmp_path: Path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Name a colour."},
        {"prompt": [{"role": "user", "content": "Say hi."}], "answer": "hi"},
        {"prompt": "Count to three."},
    ])  # fmt: skip
    db = tmp_path / "a.sqlite"
    args = ["--model", str(tiny_model), "--prompts", str(prompts), "--db", str(db), "--k", "3",
            "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "7", "--overlap", "2"]  # fmt: skip
    done = cli("prepare", *args)
    assert done.returncode == 0, done.stderr
    assert "3 items, 9 answers stored" in done.stderr
    conn = store.open_db(db)
    items = store.all_items(conn)
    assert [it.prompt for it in items.values()] == [json.loads(line)["prompt"] for line in prompts.open()]
    assert all(
        len(it.answers) == 3 and {a.model for a in it.answers} == {str(tiny_model)} for it in items.values()
    )
    assert store.overlap(conn) == 2 and store.get_meta(conn, "guidelines") == store.DEFAULT_GUIDELINES
    # the same seed in-process gives the same answers; the project is refused a second time
    cfg = PrepareConfig(model=str(tiny_model), prompts=str(prompts), db=str(tmp_path / "b.sqlite"), k=3,
                        sampling=SamplingConfig(max_new_tokens=12, temperature=1.0), seed=7)  # fmt: skip
    assert run_prepare(cfg) == {"items": 3, "dropped": 0, "answers": 9}
    again = store.all_items(store.open_db(cfg.db))
    assert [[a.text for a in it.answers] for it in again.values()] == [
        [a.text for a in it.answers] for it in items.values()
    ]
    with pytest.raises(RlhfkitError, match="already holds a labelling project"):
        run_prepare(dataclasses.replace(cfg, model="never-loaded"))  # refused before any model is loaded


@pytest.mark.slow
def test_cli_user_errors_are_one_line(tmp_path: Path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    done = cli("prepare", "--model", "tiny-llama", "--prompts", str(bad), "--db", str(tmp_path / "x.sqlite"))
    assert done.returncode == 2 and done.stderr.strip() == f"error: {bad}:2: field 'prompt': is empty"
    done = cli("prepare", "--model", "tiny-llama", "--prompts", str(bad), "--db", "x.sqlite", "--k", "1")
    assert done.returncode == 2 and "--k must be between 2 and 10" in done.stderr
    db = labelled_project(tmp_path)
    done = cli("add-user", "--db", str(db), "--name", "dora", "--role", "admin", "--password", "longenough")
    assert done.returncode == 0 and "added admin 'dora'" in done.stderr
    env = os.environ | {"RLHFKIT_FEEDBACK_PASSWORD": "from-the-env"}
    command = [*CLI, "add-user", "--db", str(db), "--name", "eve"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert store.authenticate(store.open_db(db), "eve", "from-the-env") is not None
    done = cli("export", "--db", str(db), "--out", str(tmp_path / "o.jsonl"), "--format", "csv")
    assert done.returncode == 2 and "--format must be one of pairs, rankings" in done.stderr
    done = cli("export", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2 and "no such labelling database" in done.stderr
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------------------ reward model
FILLERS = ["blue", "cold", "warm", "soft", "dark", "tall", "slow", "fast", "gold", "grey", "goat", "thin"]


@pytest.mark.slow
def test_exported_pairs_train_a_reward_model(tiny_model: Path, tmp_path: Path):
    """People prefer answers with more "good" in them; two annotators label 48 items through the store, one
    with a tie and an occasional slip. A reward model trained on the exported pairs of 36 items orders the
    answers of the 12 held-out items."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.rm import RMConfig, run_rm

    rng = random.Random(0)
    items = []
    for i in range(48):
        answers = []
        for goods in (2, 1, 0):
            words = rng.sample(FILLERS, 4)
            for slot in rng.sample(range(4), goods):
                words[slot] = "good"
            answers.append(" " + " ".join(words))
        rng.shuffle(answers)
        items.append((f"Item {i}:", answers))
    conn = make_project(tmp_path / "p.sqlite", items, 2, {"ann": "annotator", "bob": "annotator"})
    for user in store.users(conn):
        while (item_id := store.next_item(conn, user.id)) is not None:
            goods = [a.count("good") for a in items[item_id - 1][1]]
            levels = (
                [2 - g for g in goods] if user.name == "ann" else [min(1, 2 - g) for g in goods]
            )  # bob ties
            if user.name == "bob" and rng.random() < 0.1:
                levels = [1 - lv for lv in levels]  # a slip
            store.submit(conn, user.id, item_id, f"{user.name}-{item_id}", "rank", levels)
    rows = export_rows(conn, "pairs")
    assert len(rows) == 48 * (3 + 2)
    train = write_jsonl(tmp_path / "train.jsonl", [r for r in rows if r["item"] <= 36])
    held = write_jsonl(
        tmp_path / "eval.jsonl", [r for r in rows if r["item"] > 36 and r["annotator"] == "ann"]
    )
    sets = [f"model={tiny_model}", f"data.path={train}", f"data.eval_path={held}",
            f"output={tmp_path / 'rm'}",
            "train.save_every=0", "train.threads=1", "train.lr=3e-3", "train.batch_size=16", "train.epochs=4",
            "train.warmup_steps=3"]  # fmt: skip
    metrics = run_rm(load_config(RMConfig, None, sets))
    assert metrics["accuracy"] >= 0.85, metrics  # chance is 0.5
