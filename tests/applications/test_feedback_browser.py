"""A person's session in a real browser (headless Chromium): log in, rank with the mouse and with the
keyboard, tie, mark "all bad", skip; then the labels are found, as given, in `rlhfkit feedback export`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import PASSWORD, XSS, live_server, make_project

from rlhfkit.data.records import RankingRecord, load_preferences

# prompt -> (how the test labels it, the intended level of each answer text; 0 = best)
PLAN: dict[str, tuple[str, dict[str, int]]] = {
    "Name a fruit.": ("mouse", {"apple": 2, "banana": 0, "cherry": 1}),
    "Spell a letter.": ("keyboard", {"delta": 1, "echo": 1, "foxtrot": 0}),
    "Say something nice.": ("all_bad", {"meh": 0, "bah": 0}),
    "Show me <i>markup</i>": ("keyboard-reset", {XSS: 2, "plain": 0, "other": 1}),
    "Unclear prompt": ("skip", {"x1": 0, "x2": 0}),
}


@pytest.fixture(scope="module")
def browser(chromium):
    return chromium


def answers_on(page) -> dict[str, int]:
    """Answer text -> display slot, read from the page."""
    cards = page.locator(".answer")
    return {
        cards.nth(i).locator(".answer-text").inner_text(): int(cards.nth(i).get_attribute("data-slot"))
        for i in range(cards.count())
    }


def rank_with_mouse(page, slots: dict[str, int], levels: dict[str, int]) -> None:
    for text, slot in slots.items():
        page.locator(f"#rank-{slot}-{levels[text] + 1}").click()
    with page.expect_navigation():
        page.locator("#submit-rank").click()


def rank_with_keyboard(page, slots: dict[str, int], levels: dict[str, int], reset_first: bool) -> None:
    letters = "abcdefghij"
    if reset_first:  # a wrong start, cleared with Backspace
        for slot in sorted(slots.values()):
            page.keyboard.press(letters[slot])
        assert page.locator("input[type=radio]:checked").count() == len(slots)
        page.keyboard.press("Backspace")
        assert page.locator("input[type=radio]:checked").count() == 0
    previous = None
    for text in sorted(slots, key=lambda t: levels[t]):
        if previous is not None and levels[text] == levels[previous]:
            page.keyboard.press("=")
        page.keyboard.press(letters[slots[text]])
        previous = text
    for text, slot in slots.items():  # the keys set the same radio buttons the mouse would
        assert page.locator(f"#rank-{slot}-{levels[text] + 1}").is_checked()
    with page.expect_navigation():
        page.keyboard.press("Enter")


def test_label_in_a_browser_then_export(browser, tmp_path: Path):
    db = tmp_path / "fb.sqlite"
    make_project(db, [(p, list(levels)) for p, (_, levels) in PLAN.items()], 1, {"ann": "annotator"}).close()
    seen = []
    with live_server(db) as base:
        page = browser.new_page()
        page.goto(f"{base}/label")
        assert page.url.endswith("/login")
        page.fill("input[name=name]", "ann")
        page.fill("input[name=password]", PASSWORD)
        with page.expect_navigation():
            page.keyboard.press("Enter")
        for _ in PLAN:
            prompt = page.locator("#prompt").inner_text()
            how, levels = PLAN[prompt]
            seen.append(prompt)
            assert page.locator("#progress").inner_text().startswith(f"Done: {len(seen) - 1}")
            slots = answers_on(page)
            assert set(slots) == set(levels)  # the hostile answer shows as its literal text
            if how == "mouse":
                rank_with_mouse(page, slots, levels)
            elif how.startswith("keyboard"):
                rank_with_keyboard(page, slots, levels, reset_first=how.endswith("reset"))
            else:
                with page.expect_navigation():
                    page.keyboard.press("x") if how == "all_bad" else page.locator("#submit-skip").click()
            assert page.evaluate("window.__xss") is None  # no markup from a model answer ever ran
        assert sorted(seen) == sorted(PLAN)
        assert "Nothing left to label" in page.content()
        page.close()

    out = tmp_path / "rankings.jsonl"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "feedback", "export", "--db", str(db), "--out", str(out)]
    done = subprocess.run([*cmd, "--format", "rankings"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 rankings rows" in done.stderr and "1 all-bad, 1 skipped" in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(
        p for p, (how, _) in PLAN.items() if how != "all_bad" and how != "skip"
    )
    records = load_preferences(out)
    for row, record in zip(rows, records, strict=True):
        assert isinstance(record, RankingRecord)
        _, levels = PLAN[row["prompt"]]
        assert record.ranks == tuple(levels[c] for c in row["completions"])
