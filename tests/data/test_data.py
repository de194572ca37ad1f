"""Tests for rlhfkit.data.records: every reader, every validation rule, exact error messages."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rlhfkit.data import records as data
from rlhfkit.data.records import (
    PreferenceRecord,
    PromptRecord,
    RankingRecord,
    SFTRecord,
    Source,
    bundled_path,
    load_preferences,
    load_prompts,
    load_sft,
    read_rows,
    split_holdout,
)
from rlhfkit.errors import DataError


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def error(load: Callable[[Path], object], path: Path) -> str:
    with pytest.raises(DataError) as info:
        load(path)
    return str(info.value)


SFT_OK = {"prompt": "2+2?", "completion": "4"}
PAIR_OK = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
RANK_OK = {"prompt": "Hi", "completions": ["a", "b", "c"], "ranking": [0, 1, 2]}

# (loader, bad row placed on the given line, expected "line: rest" of the message)
MATRIX: list[tuple[str, Callable[[Path], object], Any, str]] = [
    ("sft-missing-prompt", load_sft, {"completion": "x"}, "field 'prompt': is missing"),
    ("sft-missing-completion", load_sft, {"prompt": "x"}, "field 'completion': is missing"),
    ("sft-empty-completion", load_sft, {"prompt": "x", "completion": ""}, "field 'completion': is empty"),
    ("sft-blank-prompt", load_sft, {"prompt": "  \n", "completion": "y"}, "field 'prompt': is empty"),
    (
        "sft-int-completion",
        load_sft,
        {"prompt": "x", "completion": 3},
        "field 'completion': must be a string or a list of messages, got int",
    ),
    (
        "sft-null-prompt",
        load_sft,
        {"prompt": None, "completion": "y"},
        "field 'prompt': must be a string or a list of messages, got null",
    ),
    (
        "sft-bad-role",
        load_sft,
        {"messages": [user("hi"), {"role": "bot", "content": "yo"}]},
        "field 'messages[1].role': role 'bot' is not one of system, user, assistant, tool",
    ),
    (
        "sft-ends-with-user",
        load_sft,
        {"messages": [user("hi"), bot("yo"), user("again")]},
        "field 'messages': must end with an assistant turn (last role is 'user')",
    ),
    (
        "sft-only-assistant",
        load_sft,
        {"messages": [bot("yo")]},
        "field 'messages': needs at least one turn before the final assistant turn",
    ),
    (
        "sft-two-assistant-turns",
        load_sft,
        {"messages": [user("hi"), bot("a"), bot("b")]},
        "field 'messages': must have a user or tool turn before the final assistant turn (it is 'assistant')",
    ),
    (
        "sft-messages-not-list",
        load_sft,
        {"messages": "hi"},
        "field 'messages': must be a list of messages, got string",
    ),
    ("sft-messages-empty", load_sft, {"messages": []}, "field 'messages': is empty"),
    (
        "sft-messages-and-prompt",
        load_sft,
        {"messages": [user("a"), bot("b")], "prompt": "a"},
        "field 'prompt': cannot be combined with 'messages'",
    ),
    (
        "sft-message-not-object",
        load_sft,
        {"messages": [user("a"), "b"]},
        "field 'messages[1]': must be a message object, got string",
    ),
    (
        "sft-missing-content",
        load_sft,
        {"messages": [{"role": "user"}, bot("b")]},
        "field 'messages[0].content': is missing",
    ),
    (
        "sft-content-not-string",
        load_sft,
        {"messages": [user("a"), {"role": "assistant", "content": [{"type": "text"}]}]},
        "field 'messages[1].content': must be a string, got list",
    ),
    (
        "sft-missing-role",
        load_sft,
        {"messages": [{"content": "a"}, bot("b")]},
        "field 'messages[0].role': is missing",
    ),
    (
        "sft-prompt-ends-with-assistant",
        load_sft,
        {"prompt": [user("a"), bot("b")], "completion": [bot("c")]},
        "field 'prompt': must end with a user or tool turn (last role is 'assistant')",
    ),
    (
        "sft-user-in-completion",
        load_sft,
        {"prompt": [user("a")], "completion": [bot("b"), user("c")]},
        "field 'completion[1].role': must be 'assistant' in an answer, got 'user'",
    ),
    (
        "sft-mixed-forms",
        load_sft,
        {"prompt": "a", "completion": [bot("b")]},
        "field 'completion': is a list of messages but 'prompt' is a string; use the same form for both",
    ),
    ("not-an-object", load_sft, "[1, 2]", "expected a JSON object, got list"),
    (
        "pair-missing-rejected",
        load_preferences,
        {"prompt": "p", "chosen": "a"},
        "field 'rejected': is missing",
    ),
    (
        "pair-identical",
        load_preferences,
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        "field 'rejected': is identical to 'chosen'",
    ),
    (
        "pair-empty-chosen-message",
        load_preferences,
        {"prompt": [user("p")], "chosen": [bot("")], "rejected": [bot("no")]},
        "field 'chosen[0].content': is empty",
    ),
    (
        "pair-chosen-bad-role",
        load_preferences,
        {"prompt": [user("p")], "chosen": [{"role": "human", "content": "x"}], "rejected": [bot("no")]},
        "field 'chosen[0].role': role 'human' is not one of system, user, assistant, tool",
    ),
    (
        "pair-nan-margin",
        load_preferences,
        '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}',
        "field 'margin': must be a finite number, got nan",
    ),
    (
        "pair-inf-margin",
        load_preferences,
        '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -Infinity}',
        "field 'margin': must be a finite number, got -inf",
    ),
    (
        "pair-string-margin",
        load_preferences,
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "1"},
        "field 'margin': must be a number, got string",
    ),
    (
        "rank-duplicate",
        load_preferences,
        {**RANK_OK, "ranking": [0, [1, 0], 2]},
        "field 'ranking': index 0 appears twice",
    ),
    (
        "rank-out-of-range",
        load_preferences,
        {**RANK_OK, "ranking": [0, 1, 4]},
        "field 'ranking': index 4 out of range for 3 completions",
    ),
    ("rank-missing", load_preferences, {**RANK_OK, "ranking": [0, 1]}, "field 'ranking': index 2 missing"),
    (
        "rank-missing-several",
        load_preferences,
        {**RANK_OK, "completions": ["a", "b", "c", "d"], "ranking": [3, 0]},
        "field 'ranking': indices 1, 2 missing",
    ),
    (
        "rank-all-tied",
        load_preferences,
        {**RANK_OK, "ranking": [[2, 0, 1]]},
        "field 'ranking': ties all 3 completions, so there is nothing to learn",
    ),
    (
        "rank-bool-index",
        load_preferences,
        {**RANK_OK, "ranking": [0, True, 2]},
        "field 'ranking[1]': must be a completion index or a list of tied indices, got bool",
    ),
    (
        "rank-nested-too-deep",
        load_preferences,
        {**RANK_OK, "ranking": [0, [1, [2]]]},
        "field 'ranking[1][1]': must be a completion index, got list",
    ),
    (
        "rank-empty-tie",
        load_preferences,
        {**RANK_OK, "ranking": [0, [], 1, 2]},
        "field 'ranking[1]': is an empty tie group",
    ),
    (
        "rank-missing-ranking",
        load_preferences,
        {"prompt": "p", "completions": ["a", "b"]},
        "field 'ranking': is missing",
    ),
    (
        "rank-one-completion",
        load_preferences,
        {"prompt": "p", "completions": ["a"], "ranking": [0]},
        "field 'completions': needs at least 2 answers, got 1",
    ),
    (
        "rank-empty-completion",
        load_preferences,
        {**RANK_OK, "completions": ["a", "", "c"]},
        "field 'completions[1]': is empty",
    ),
    (
        "rank-duplicate-completion",
        load_preferences,
        {**RANK_OK, "completions": ["a", "b", "a"]},
        "field 'completions[2]': is identical to 'completions[0]'",
    ),
    (
        "rank-with-chosen",
        load_preferences,
        {**RANK_OK, "chosen": "a"},
        "field 'chosen': cannot be combined with 'completions'",
    ),
    ("prompt-missing", load_prompts, {"question": "x"}, "field 'prompt': is missing"),
    (
        "prompt-list-of-strings",
        load_prompts,
        {"prompt": ["hi"]},
        "field 'prompt[0]': must be a message object, got string",
    ),
]


@pytest.mark.parametrize(("load", "bad", "expected"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_validation_matrix(tmp_path: Path, load: Callable[[Path], object], bad: Any, expected: str) -> None:
    good = {load_sft: SFT_OK, load_preferences: PAIR_OK, load_prompts: {"prompt": "p"}}[load]
    # The bad row sits on physical line 4: two good rows and a blank line come first.
    p = write_jsonl(tmp_path / "d.jsonl", [good, good, "", bad, good])
    assert error(load, p) == f"{p}:4: {expected}"


# ------------------------------------------------------------------------------------ jsonl reading


def test_malformed_json_on_line_2(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [SFT_OK, '{"prompt": "a", "completion": }'])
    assert error(load_sft, p) == f"{p}:2: invalid JSON: Expecting value (column 31)"


def test_non_utf8_on_line_3(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    line = json.dumps(SFT_OK).encode()
    p.write_bytes(line + b"\n" + line + b"\n" + b'{"prompt": "\xc3\xa9t\xff", "completion": "x"}\n')
    assert error(load_sft, p) == f"{p}:3: is not valid UTF-8 (byte 0xff at column 15)"


def test_jsonl_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\r\n\r\n  \n{"prompt": "c", "completion": "d"}'
    )
    assert [line for line, _ in read_rows(p)] == [1, 4]


# ------------------------------------------------------------------------------------ file-level errors


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.jsonl"
    assert error(load_sft, p) == f"{p}: no such file"


def test_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "d.xyz"
    p.write_text("{}")
    assert error(load_sft, p) == (
        f"{p}: unsupported file type '.xyz' (use .jsonl, .json, .parquet, .csv or a datasets directory)"
    )


@pytest.mark.parametrize(
    ("name", "text"),
    [("e.jsonl", ""), ("b.jsonl", "\n \n"), ("e.json", " [ ] "), ("e.csv", "prompt,completion\n")],
)
def test_empty_file(tmp_path: Path, name: str, text: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    assert error(load_sft, p) == f"{p}: contains no records"


def test_directory_that_is_not_a_dataset(tmp_path: Path) -> None:
    assert (
        error(load_sft, tmp_path)
        == f"{tmp_path}: is a directory but not a dataset saved with datasets' save_to_disk"
    )


# ------------------------------------------------------------------------------------ .json


def test_json_array_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    rows = [PAIR_OK, {"prompt": "p", "chosen": "x", "rejected": "x"}]
    p.write_text(json.dumps(rows, indent=2))  # objects start on lines 2 and 7
    assert p.read_text().splitlines()[6] == "  {"
    assert error(load_preferences, p) == f"{p}:7: field 'rejected': is identical to 'chosen'"


def test_json_object_on_line_5(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(
        '[\n  {"prompt": "a", "completion": "b"},\n\n'
        '  {"prompt": "c",\n\n   "completion": "d"}, \n'
        '  {"prompt": "e"}\n]\n'
    )
    assert [line for line, _ in read_rows(p)] == [2, 4, 7]
    assert error(load_sft, p) == f"{p}:7: field 'completion': is missing"
    p.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n\n  {"prompt": 5, "completion": "d"}\n]')
    assert error(load_sft, p) == f"{p}:5: field 'prompt': must be a string or a list of messages, got int"


def test_json_happy_path(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(json.dumps([SFT_OK, {"messages": [user("hi"), bot("hello")]}]))
    records = load_sft(p)
    assert records[0] == SFTRecord("2+2?", "4", Source(str(p), 1))
    assert records[1].prompt == [user("hi")]
    assert records[1].completion == [bot("hello")]


def test_json_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b",}\n]')
    assert (
        error(load_prompts, p)
        == f"{p}:3: invalid JSON: Expecting property name enclosed in double quotes (column 18)"
    )
    p.write_text('{"data": []}')
    assert error(load_prompts, p) == f"{p}: must hold a JSON array of records, got object"
    p.write_text('[{"prompt": "a"},\n "b"]')
    assert error(load_prompts, p) == f"{p}:2: expected a JSON object, got string"


# ------------------------------------------------------------------------------------ .csv


def test_csv_happy_path(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text(
        "prompt,chosen,rejected,margin,completions,ranking\n"
        '"[INST] hi","yes, sure",no,1.5,,\n'
        '"[{""role"": ""user"", ""content"": ""hi""}]","[{""role"": ""assistant"", ""content"": ""yo""}]",'
        '"[{""role"": ""assistant"", ""content"": ""no""}]",,,\n'
        'q,,,,"[""a"", ""b"", ""c""]","[2, [0, 1]]"\n'
    )
    pair, messages, ranking = load_preferences(p)
    assert pair == PreferenceRecord("[INST] hi", "yes, sure", "no", 1.5, Source(str(p), 2))
    assert messages == PreferenceRecord([user("hi")], [bot("yo")], [bot("no")], 0.0, Source(str(p), 3))
    assert ranking == RankingRecord("q", ("a", "b", "c"), (1, 1, 0), Source(str(p), 4))


def test_csv_row_line_number(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    # Row 1 spans lines 2-3 (quoted newline), a blank line 4, the bad row starts on line 5.
    p.write_text('prompt,completion\n"multi\nline",ok\n\nq,\n')
    assert [line for line, _ in read_rows(p)] == [2, 5]
    assert error(load_sft, p) == f"{p}:5: field 'completion': is missing"


def test_csv_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text('prompt,completion\n"[{""role"": ""user""",x\n')
    assert error(load_sft, p) == f"{p}:2: field 'prompt': invalid JSON: Expecting ',' delimiter (column 17)"
    p.write_text("prompt,completion\na,b,c\n")
    assert error(load_sft, p) == f"{p}:2: has 3 cells but the header has 2 columns"
    p.write_text("prompt,prompt\na,b\n")
    assert error(load_sft, p) == f"{p}:1: column 'prompt' appears twice in the header"
    p.write_text("prompt,chosen,rejected,margin\na,b,c,nan\n")
    assert error(load_preferences, p) == f"{p}:2: field 'margin': must be a finite number, got nan"
    p.write_text("prompt,chosen,rejected,margin\na,b,c,big\n")
    assert error(load_preferences, p) == f"{p}:2: field 'margin': must be a number, got string"
    p.write_bytes(b"prompt,completion\na,b\nc,\xe9\n")
    assert error(load_sft, p) == f"{p}:3: is not valid UTF-8 (byte 0xe9 at column 3)"


# ------------------------------------------------------------------------------------ .parquet


def test_parquet_rows_and_nulls(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.0, "completions": None, "ranking": None},
        {
            "prompt": "p",
            "chosen": None,
            "rejected": None,
            "margin": None,
            "completions": ["a", "b", "c", "d"],
            "ranking": [[2], [0, 3], [1]],
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), p)
    pair, ranking = load_preferences(p)
    assert pair == PreferenceRecord("p", "a", "b", 2.0, Source(str(p), 1))
    assert isinstance(ranking, RankingRecord)
    assert ranking.ranks == (1, 2, 0, 1)
    assert ranking.source == Source(str(p), 2)

    rows.append({**rows[0], "rejected": "a"})
    pq.write_table(pa.Table.from_pylist(rows), p)
    assert error(load_preferences, p) == f"{p}:3: field 'rejected': is identical to 'chosen'"


def test_parquet_messages(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    rows = [
        {"messages": [{"role": "system", "content": ""}, user("hi"), bot("yo")]},
        {"messages": [user("a"), user("b")]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), p)
    with pytest.raises(DataError) as info:
        load_sft(p)
    assert (
        str(info.value) == f"{p}:2: field 'messages': must end with an assistant turn (last role is 'user')"
    )
    pq.write_table(pa.Table.from_pylist(rows[:1]), p)
    [record] = load_sft(p)
    assert record.prompt == [{"role": "system", "content": ""}, user("hi")]


def test_unreadable_parquet(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    p.write_text("not parquet")
    assert error(load_sft, p).startswith(f"{p}: is not a readable Parquet file (")


# ------------------------------------------------------------------------------------ datasets directory


def test_datasets_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    rows = [{"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "", "answer": "0"}]
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "ok"))
    [record] = load_prompts(tmp_path / "ok")
    assert record == PromptRecord("What is 2+2?", {"answer": "4"}, Source(str(tmp_path / "ok"), 1))

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert error(load_prompts, tmp_path / "dd") == f"{tmp_path / 'dd'}:2: field 'prompt': is empty"

    splits = {"test": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "nt"))
    assert (
        error(load_prompts, tmp_path / "nt")
        == f"{tmp_path / 'nt'}: has no 'train' split (splits: test, validation)"
    )


# ------------------------------------------------------------------------------------ records


def test_happy_path_jsonl_records(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "prompt": [{"role": "system", "content": "Be nice.", "name": "x"}, user("hi")],
                "completion": [bot("hello")],
            },
            {"messages": [user("a"), bot("b"), {"role": "tool", "content": ""}, bot("c")], "id": 7},
        ],
    )
    first, second = load_sft(p)
    assert first.prompt == [{"role": "system", "content": "Be nice."}, user("hi")]  # extra keys dropped
    assert second == SFTRecord(
        [user("a"), bot("b"), {"role": "tool", "content": ""}], [bot("c")], Source(str(p), 2)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.prompt = "x"  # type: ignore[misc]

    p = write_jsonl(
        tmp_path / "p.jsonl",
        [{**PAIR_OK, "margin": 3}, {"prompt": "q", "completions": ["a", "b"], "ranking": [1, 0]}],
    )
    pair, ranking = load_preferences(p)
    assert pair == PreferenceRecord("Hi", "Hello!", "Go away.", 3.0, Source(str(p), 1))
    assert isinstance(pair.margin, float)
    assert ranking == RankingRecord("q", ("a", "b"), (1, 0), Source(str(p), 2))

    p = write_jsonl(tmp_path / "r.jsonl", [{"prompt": [user("2+2?")], "answer": 4, "level": "easy"}])
    assert load_prompts(p) == [
        PromptRecord([user("2+2?")], {"answer": 4, "level": "easy"}, Source(str(p), 1))
    ]


def test_messages_are_copied(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [user("hi")]}])
    [(_, row)] = list(read_rows(p))
    [record] = load_prompts(p)
    assert record.prompt is not row["prompt"]


def test_ranks_and_pairs(tmp_path: Path) -> None:
    row = {"prompt": "p", "completions": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]}
    [record] = load_preferences(write_jsonl(tmp_path / "r.jsonl", [row]))
    assert isinstance(record, RankingRecord)
    assert record.ranks == (1, 2, 0, 1)
    assert record.pairs() == [(0, 1), (2, 0), (2, 1), (2, 3), (3, 1)]
    assert RankingRecord("p", ("a", "b", "c"), (0, 1, 2), Source("x", 1)).pairs() == [(0, 1), (0, 2), (1, 2)]


# ------------------------------------------------------------------------------------ split_holdout


def test_split_holdout() -> None:
    records = list(range(100))
    train, held = split_holdout(records, 0.1, seed=3)
    assert len(held) == 10
    assert len(train) == 90
    assert sorted(train + held) == records
    assert train == sorted(train)  # both parts keep file order
    assert held == sorted(held)
    assert split_holdout(records, 0.1, seed=3) == (train, held)
    assert split_holdout(records, 0.1, seed=4)[1] != held


def test_split_holdout_sizes() -> None:
    assert split_holdout([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    assert len(split_holdout([1, 2, 3], 0.01, seed=0)[1]) == 1  # at least one
    assert len(split_holdout([1, 2], 0.9, seed=0)[1]) == 1  # never everything
    assert split_holdout([1], 0.5, seed=0) == ([1], [])
    assert split_holdout([], 0.5, seed=0) == ([], [])
    with pytest.raises(ValueError):
        split_holdout([1, 2], 1.0, seed=0)


# ------------------------------------------------------------------------------------ bundled_path


def test_bundled_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_assets_dir", lambda: tmp_path)
    (tmp_path / "tiny.jsonl").write_text("{}\n")
    assert bundled_path("tiny.jsonl") == tmp_path / "tiny.jsonl"
    with pytest.raises(DataError) as info:
        bundled_path("nope.jsonl")
    assert str(info.value) == "rlhfkit/assets/nope.jsonl: no such bundled file (available: tiny.jsonl)"
    with pytest.raises(DataError):
        bundled_path("../tiny.jsonl")
