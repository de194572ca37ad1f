"""The `os` environment's tasks: small folders of files drawn from a seed, a question about them (or a job to
do in them), the exact answer, and a shell command that finds it.

A task's data: `type` (the generator's name), `files` ({relative path: text}; a path ending in "/" is an
empty folder), `answer` (the exact answer as text), `kind` ("number", "text" or "check"),
`choices` (the names a text answer is read against), `command` (a gold command whose output is the answer,
for tests and demonstrations) and, for kind "check", `check` (a command run in the sandbox after the episode;
its output must equal `answer`). Train (300) and test (60) use different seeds; a train task identical to a
test task is dropped.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from typing import Any

from rlhfkit.agents.db_tasks import CITIES, PEOPLE
from rlhfkit.agents.env import Split, Task, generated_split

SIZES = {"train": 300, "test": 60}
WORDS = [
    "alpha",
    "report",
    "draft",
    "notes",
    "data",
    "summary",
    "backup",
    "config",
    "index",
    "budget",
    "photo",
    "invoice",
    "plan",
    "task",
    "sales",
    "users",
    "audit",
    "memo",
    "trip",
    "recipe",
]
LOREM = [
    "the",
    "server",
    "disk",
    "quick",
    "update",
    "network",
    "user",
    "file",
    "cache",
    "build",
    "test",
    "value",
    "system",
    "daily",
    "job",
    "queue",
    "sync",
    "copy",
    "node",
    "time",
]
Draw = tuple[str, dict[str, str], str, str, list[str], str]  # prompt, files, answer, kind, choices, command


def names(rng: random.Random, n: int, ext: str) -> list[str]:
    chosen = rng.sample([f"{w}_{i}" for w in WORDS for i in range(1, 40)], n)
    return [f"{c}{ext}" for c in chosen]


def text(rng: random.Random, lines: int) -> str:
    return "".join(" ".join(rng.choices(LOREM, k=rng.randint(3, 9))) + "\n" for _ in range(lines))


def count_ext(rng: random.Random) -> Draw:
    ext = rng.choice([".log", ".csv", ".txt", ".py"])
    files, root = {}, rng.choice(["logs", "project", "work", "inbox"])
    subdirs = ["", *rng.sample(["a", "b", "old", "2024", "tmp", "x/y"], rng.randint(1, 3))]
    for d in subdirs:
        for name in names(rng, rng.randint(1, 6), rng.choice([ext, ext, ".md", ".json", ".bak"])):
            files[f"{root}/{d}/{name}".replace("//", "/")] = text(rng, rng.randint(1, 4))
    files[f"{root}/{subdirs[-1]}/{names(rng, 1, ext)[0]}"] = "x\n"  # at least one in a subfolder
    count = sum(p.endswith(ext) for p in files)
    prompt = f"How many files with the extension {ext} are in the folder {root}, including its subfolders?"
    return prompt, files, str(count), "number", [], f"find {root} -type f -name '*{ext}' | wc -l"


def largest_file(rng: random.Random) -> Draw:
    folder, files = rng.choice(["data", "downloads", "media"]), {}
    sizes = rng.sample(range(20, 4000), rng.randint(4, 9))
    for name, size in zip(names(rng, len(sizes), rng.choice([".bin", ".dat", ".txt"])), sizes, strict=True):
        files[f"{folder}/{name}"] = "z" * size
    best = max(files, key=lambda p: len(files[p])).split("/")[-1]
    prompt = f"Which file in the folder {folder} is the largest? Answer with its file name."
    return prompt, files, best, "text", [p.split("/")[-1] for p in files], f"ls -S {folder} | head -1"


def sum_numbers(rng: random.Random) -> Draw:
    numbers = [rng.randint(-500, 5000) for _ in range(rng.randint(15, 60))]
    name = rng.choice(["numbers.txt", "values.txt", "amounts.txt", "readings.txt"])
    files = {name: "\n".join(map(str, numbers)) + "\n"}
    prompt = f"The file {name} holds one integer per line. What is the sum of all of them?"
    return prompt, files, str(sum(numbers)), "number", [], f"awk '{{s += $1}} END {{print s}}' {name}"


def grep_lines(rng: random.Random) -> Draw:
    word = rng.choice(["ERROR", "WARNING", "TIMEOUT", "DENIED"])
    lines = []
    for _ in range(rng.randint(20, 80)):
        line = " ".join(rng.choices(LOREM, k=rng.randint(3, 8)))
        if rng.random() < 0.3:
            line = f"{line} {word} {rng.choice(LOREM)}"
        lines.append(f"2024-05-{rng.randint(10, 28)} {line}")
    name = rng.choice(["server.log", "app.log", "syslog.txt"])
    count = sum(word in line for line in lines)
    prompt = f"How many lines of {name} contain the word {word}?"
    return prompt, {name: "\n".join(lines) + "\n"}, str(count), "number", [], f"grep -c {word} {name}"


def word_count(rng: random.Random) -> Draw:
    word = rng.choice(["apple", "river", "yellow", "engine"])
    body = text(rng, rng.randint(10, 40)).splitlines()
    total = 0
    for i in rng.sample(range(len(body)), rng.randint(2, min(10, len(body)))):
        times = rng.randint(1, 3)
        body[i] = " ".join([body[i], *[word] * times])
        total += times
    name = rng.choice(["notes.txt", "story.txt", "letter.txt"])
    prompt = f"How many times does the word {word} occur in {name}?"
    return (
        prompt,
        {name: "\n".join(body) + "\n"},
        str(total),
        "number",
        [],
        f"grep -o -w {word} {name} | wc -l",
    )


def most_lines(rng: random.Random) -> Draw:
    folder = rng.choice(["texts", "chapters", "docs"])
    counts = rng.sample(range(3, 90), rng.randint(3, 7))
    files = {
        f"{folder}/{n}": text(rng, c) for n, c in zip(names(rng, len(counts), ".txt"), counts, strict=True)
    }
    best = max(files, key=lambda p: files[p].count("\n")).split("/")[-1]
    prompt = f"Which file in the folder {folder} has the most lines? Answer with its file name."
    command = f"wc -l {folder}/* | sort -n | tail -2 | head -1"
    return prompt, files, best, "text", [p.split("/")[-1] for p in files], command


def csv_question(rng: random.Random) -> Draw:
    people = rng.sample(PEOPLE[:16], rng.randint(6, 14))
    ages = rng.sample(range(18, 80), len(people))
    rows = [(p, rng.choice(CITIES[: rng.randint(3, 8)]), a) for p, a in zip(people, ages, strict=True)]
    files = {"people.csv": "name,city,age\n" + "".join(f"{p},{c},{a}\n" for p, c, a in rows)}
    if rng.random() < 0.5:
        prompt = "How many different cities appear in the city column of people.csv?"
        command = "tail -n +2 people.csv | cut -d, -f2 | sort -u | wc -l"
        return prompt, files, str(len({c for _, c, _ in rows})), "number", [], command
    oldest = max(rows, key=lambda r: r[2])[0]
    prompt = "Who is the oldest person in people.csv? Answer with the name."
    command = "tail -n +2 people.csv | sort -t, -k3 -n | tail -1 | cut -d, -f1"
    return prompt, files, oldest, "text", people, command


def find_string(rng: random.Random) -> Draw:
    folder = rng.choice(["docs", "mail", "archive"])
    token = f"KEY-{rng.randint(1000, 9999)}{rng.choice('ABCDEFGHJK')}"
    chosen = names(rng, rng.randint(4, 10), ".txt")
    files = {f"{folder}/{n}": text(rng, rng.randint(3, 12)) for n in chosen}
    target = rng.choice(chosen)
    files[f"{folder}/{target}"] += f"the access code is {token}\n"
    prompt = f"Which file in the folder {folder} contains the text {token}? Answer with its file name."
    return prompt, files, target, "text", chosen, f"grep -rl {token} {folder} | xargs -n1 basename"


def count_dirs(rng: random.Random) -> Draw:
    root, files = rng.choice(["projects", "photos", "backups"]), {}
    dirs: set[str] = set()
    for _ in range(rng.randint(2, 9)):
        path = "/".join(rng.sample(["a", "b", "c", "2023", "2024", "old", "new", "misc"], rng.randint(1, 3)))
        parts = path.split("/")
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        if rng.random() < 0.5:
            files[f"{root}/{path}/{names(rng, 1, '.txt')[0]}"] = "x\n"
        else:
            files[f"{root}/{path}/"] = ""
    prompt = f"How many folders are inside {root}, at any depth (not counting {root} itself)?"
    return prompt, files, str(len(dirs)), "number", [], f"find {root} -mindepth 1 -type d | wc -l"


def empty_files(rng: random.Random) -> Draw:
    folder = rng.choice(["cache", "spool", "queue"])
    chosen = names(rng, rng.randint(4, 14), rng.choice([".tmp", ".dat", ""]))
    files = {f"{folder}/{n}": ("" if rng.random() < 0.4 else text(rng, 1)) for n in chosen}
    count = sum(v == "" for v in files.values())
    prompt = f"How many empty files are in the folder {folder}?"
    return prompt, files, str(count), "number", [], f"find {folder} -type f -empty | wc -l"


def copy_files(rng: random.Random) -> Draw:
    ext, folder = rng.choice([".log", ".csv", ".txt"]), rng.choice(["incoming", "scans", "exports"])
    chosen = names(rng, rng.randint(3, 8), ext) + names(rng, rng.randint(1, 4), ".tmp")
    files = {f"{folder}/{n}": text(rng, 2) for n in chosen}
    wanted = sorted(n for n in chosen if n.endswith(ext))
    prompt = (
        f"Copy every {ext} file of the folder {folder} into a new folder named archive (same file names, no "
        "other files), then reply with done."
    )
    command = f"mkdir -p archive && cp {folder}/*{ext} archive/ && echo done"
    return prompt, files, " ".join(wanted), "check", [], command


TYPES: list[Callable[[random.Random], Draw]] = [
    count_ext,
    largest_file,
    sum_numbers,
    grep_lines,
    word_count,
    most_lines,
    csv_question,
    find_string,
    count_dirs,
    empty_files,
    copy_files,
]
CHECK = "ls -A archive | sort | tr '\\n' ' '"  # the copy task's check: the archive's names, one line


def draw(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """One task's prompt and data (see the module docstring)."""
    while True:
        kind_fn = rng.choice(TYPES)
        prompt, files, answer, kind, choices, command = kind_fn(rng)
        if kind == "text" and len(set(choices)) != len(choices):
            continue
        data: dict[str, Any] = {"type": kind_fn.__name__, "files": files, "answer": answer, "kind": kind}
        data.update(choices=choices, command=command)
        if kind == "check":
            data["check"] = CHECK
        return prompt, data


@functools.cache
def make_tasks(split: Split) -> tuple[Task, ...]:
    """The tasks of a split, the same on every call and machine (see the module docstring)."""
    return generated_split(
        "os", split, SIZES, draw, lambda prompt, data: json.dumps([prompt, data["files"]], sort_keys=True)
    )
