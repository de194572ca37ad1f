"""A person labels agent episodes in a real browser (headless Chromium): three episodes with tool calls,
ranked with the mouse and then with the keyboard (a tie), turns flagged with their checkboxes, a long tool
output unfolded; a tool output holding `<script>` shows as text and never runs. The labels come back, as
given, from `rlhfkit feedback export` as trajectory records."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.applications.test_feedback_episodes import EPISODES, episode_project
from tests.helpers import PASSWORD, XSS, live_server

from rlhfkit.data.records import load_preferences
from rlhfkit.data.trajectories import TrajectoryRecord

MARKERS = list(EPISODES)  # the last assistant text of each stored episode, in stored order
# per item: how it is ranked, each episode's level (0 = best) and flagged assistant turns, by marker
PLAN = [
    ("mouse", {MARKERS[0]: 0, MARKERS[1]: 2, MARKERS[2]: 1}, {MARKERS[1]: [1]}),
    ("keyboard", {MARKERS[0]: 0, MARKERS[1]: 1, MARKERS[2]: 1}, {MARKERS[1]: [0, 1], MARKERS[2]: [2]}),
]


def slots_on(page) -> dict[str, int]:
    """Episode marker -> display slot, read from the page."""
    cards = page.locator(".episode")
    out = {}
    for i in range(cards.count()):
        text = cards.nth(i).inner_text()
        [marker] = [m for m in MARKERS if m in text]
        out[marker] = int(cards.nth(i).get_attribute("data-slot"))
    return out


def test_rank_and_flag_episodes_in_a_browser_then_export(chromium, tmp_path: Path):
    db = tmp_path / "fb.sqlite"
    episode_project(db, {"ann": "annotator"}, items=2).close()
    with live_server(db) as base:
        page = chromium.new_page()
        page.goto(f"{base}/label")
        page.fill("input[name=name]", "ann")
        page.fill("input[name=password]", PASSWORD)
        with page.expect_navigation():
            page.keyboard.press("Enter")
        for how, levels, flags in PLAN:
            slots = slots_on(page)
            assert set(slots) == set(MARKERS)
            assert [page.locator(".episode .key").nth(i).inner_text() for i in range(3)] == ["A", "B", "C"]
            # the hostile tool output is on the page as its literal text; the long log is folded until opened
            hostile = page.locator(f"#episode-{slots[MARKERS[2]]} .turn.tool .output").first
            assert hostile.inner_text() == XSS and hostile.is_visible()
            folded = page.locator(f"#episode-{slots[MARKERS[2]]} details.folded")
            assert not folded.locator(".output").is_visible()
            folded.locator("summary").click()
            assert folded.locator(".output").is_visible() and "log line 39" in folded.inner_text()
            calls = page.locator(f"#episode-{slots[MARKERS[1]]} .call").all_inner_texts()
            assert calls == ['▶ refund({"order": 7, "amount": 300})']
            for marker, turns in flags.items():
                for turn in turns:
                    page.locator(f"#flag-{slots[marker]}-{turn}").check()
            if how == "mouse":
                for marker, slot in slots.items():
                    page.locator(f"#rank-{slot}-{levels[marker] + 1}").click()
                with page.expect_navigation():
                    page.locator("#submit-rank").click()
            else:
                page.locator("h2").first.click()  # the keys go to the page, not a checkbox
                previous = None
                for marker in sorted(slots, key=lambda m: levels[m]):
                    if previous is not None and levels[marker] == levels[previous]:
                        page.keyboard.press("=")
                    page.keyboard.press("abc"[slots[marker]])
                    previous = marker
                for marker, slot in slots.items():
                    assert page.locator(f"#rank-{slot}-{levels[marker] + 1}").is_checked()
                with page.expect_navigation():
                    page.keyboard.press("Enter")
            assert page.evaluate("window.__xss") is None  # no markup from a tool or the model ever ran
        assert "Nothing left to label" in page.content()
        page.close()

    out = tmp_path / "rankings.jsonl"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "feedback", "export", "--db", str(db), "--out", str(out)]
    done = subprocess.run([*cmd, "--format", "rankings"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 rankings rows" in done.stderr
    records = load_preferences(out)
    for record, (_, levels, flags) in zip(records, PLAN, strict=True):
        assert isinstance(record, TrajectoryRecord)
        assert record.ranks == tuple(levels[m] for m in MARKERS)
        assert [e.flags for e in record.episodes] == [tuple(flags.get(m, [])) for m in MARKERS]
        assert [e.messages[-1]["content"] for e in record.episodes] == MARKERS
        assert record.episodes[2].messages[1]["content"] == XSS
