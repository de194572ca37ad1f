"""Labels out of the database, into the preference formats `rlhfkit rm` and `rlhfkit dpo` read.

* ``rankings``: one row per (item, annotator) ranking, ``{"prompt", "completions", "ranking"}`` exactly as
  ``rlhfkit.data.records`` reads a RankingRecord: completions in the item's stored order, the ranking best to
  worst with tied answers in a nested list (``[2, [0, 1]]``). Extra fields that the loader ignores keep
  the provenance: ``item``, ``annotator``, ``models`` (which model wrote each completion).
* ``pairs``: for every ranking, one ``{"prompt", "chosen", "rejected"}`` row per pair of answers at
  different levels (K-choose-2 at most); tied answers give no pair. Plus ``item`` and ``annotator``.

Several annotators of one item each contribute their own rows: where they agree the pair counts twice,
where they disagree the two rows pull against each other, which is what their labels say.

Left out of both: skips (no judgement), and "all bad" labels. "All bad" says every answer is unacceptable
but nothing about their order, so it makes no pair, and a ranking with a single level is not a valid
RankingRecord (nothing to learn). They stay in the database and are counted on the admin page and by
the export command, for whoever wants to use them (e.g. to drop prompts or as SFT negatives).

A prompt given as messages gets message answers (``[{"role": "assistant", "content": ...}]``), since the
data format wants prompt and answers in the same form. The file is written atomically.

Episode items (`feedback.episodes`) become trajectory rankings, the format of `rlhfkit.data.trajectories`:
``{"prompt", "tools", "episodes", "ranking", "task_id", "env"}``, each episode with its messages, the tokens
the sampler produced (when a local policy acted) and the annotator's ``flags``; provenance beside it as for
answers (``item``, ``annotator``, ``models``) plus ``returns``, the environment's return of each episode.
``rankings`` gives one row per (item, annotator); ``pairs`` one two-episode row per (better, worse) pair,
ranked ``[0, 1]``. Either kind of row loads with `rlhfkit.data.records.load_preferences`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rlhfkit.feedback.episodes import EpisodeItem, episode_items
from rlhfkit.feedback.store import Item, Label, all_items, labels
from rlhfkit.fileio import write_atomic

Format = Literal["pairs", "rankings"]
FORMATS: tuple[Format, ...] = ("pairs", "rankings")


def ranking_json(levels: Sequence[int]) -> list[Any]:
    """Levels per answer -> the data format's best-to-worst list, ties nested: (1, 0, 1) -> [1, [0, 2]]."""
    out: list[Any] = []
    for level in sorted(set(levels)):
        group = [i for i, lv in enumerate(levels) if lv == level]
        out.append(group[0] if len(group) == 1 else group)
    return out


def _answer(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def ranking_row(item: Item, label: Label) -> dict[str, Any]:
    assert label.ranks is not None
    return {
        "prompt": item.prompt,
        "completions": [_answer(item.prompt, a.text) for a in item.answers],
        "ranking": ranking_json(label.ranks),
        "item": item.id,
        "annotator": label.user,
        "models": [a.model for a in item.answers],
    }


def pair_rows(item: Item, label: Label) -> list[dict[str, Any]]:
    """Every (better, worse) pair of one ranking, better first; ties make none."""
    ranks = label.ranks
    assert ranks is not None
    n = len(ranks)
    return [
        {
            "prompt": item.prompt,
            "chosen": _answer(item.prompt, item.answers[i].text),
            "rejected": _answer(item.prompt, item.answers[j].text),
            "item": item.id,
            "annotator": label.user,
        }
        for i in range(n)
        for j in range(n)
        if ranks[i] < ranks[j]
    ]


def trajectory_row(item: EpisodeItem, label: Label, positions: Sequence[int] | None = None) -> dict[str, Any]:
    """A trajectory ranking of the episodes at ``positions`` (default: all, in stored order) as ``label``
    ranks and flags them."""
    assert label.ranks is not None
    positions = list(range(len(item.episodes))) if positions is None else list(positions)
    flags = label.flags or tuple(() for _ in item.episodes)
    episodes = [
        {"messages": item.episodes[p].messages, **(item.episodes[p].tokens or {}), "flags": list(flags[p])}
        for p in positions
    ]
    row: dict[str, Any] = {"prompt": item.prompt}
    if item.tools:
        row["tools"] = item.tools
    return row | {
        "episodes": episodes, "ranking": ranking_json([label.ranks[p] for p in positions]),
        "task_id": item.task_id, "env": item.env, "item": item.id, "annotator": label.user,
        "models": [item.episodes[p].model for p in positions],
        "returns": [item.episodes[p].outcome.get("reward") for p in positions],
    }  # fmt: skip


def trajectory_pair_rows(item: EpisodeItem, label: Label) -> list[dict[str, Any]]:
    """Every (better, worse) pair of one ranking of episodes as a two-episode trajectory row, better first."""
    ranks = label.ranks
    assert ranks is not None
    n = len(ranks)
    return [trajectory_row(item, label, (i, j)) for i in range(n) for j in range(n) if ranks[i] < ranks[j]]


def export_rows(conn: sqlite3.Connection, fmt: Format) -> list[dict[str, Any]]:
    """The rows of an export, in item then annotator order."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (use {' or '.join(FORMATS)})")
    items, episodes = all_items(conn), episode_items(conn)
    rows: list[dict[str, Any]] = []
    for label in labels(conn, kinds=("rank",)):
        if label.item_id in episodes:
            episode_item = episodes[label.item_id]
            if fmt == "rankings":
                rows.append(trajectory_row(episode_item, label))
            else:
                rows += trajectory_pair_rows(episode_item, label)
            continue
        item = items[label.item_id]
        rows += [ranking_row(item, label)] if fmt == "rankings" else pair_rows(item, label)
    return rows


def to_jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def export(conn: sqlite3.Connection, out: Path, fmt: Format) -> dict[str, int]:
    """Write the export to ``out``; returns the rows written and the labels left out, by kind."""
    rows = export_rows(conn, fmt)
    write_atomic(out, to_jsonl(rows))
    left_out = {kind: len(labels(conn, kinds=(kind,))) for kind in ("all_bad", "skip")}
    return {"rows": len(rows), **left_out}
