"""LLM judges of episodes: a judge with a planted position bias ranks by the order it is shown in when asked
once, and by quality alone when asked in both orders; the agreement report equals a hand computation."""

from __future__ import annotations

import itertools
import re

import pytest

from rlhfkit.chat.llm import Completion
from rlhfkit.feedback.judges import EpisodeJudge, judge_agreement

PROMPT = [{"role": "user", "content": "Refund order 7."}]


def episode(quality: int) -> list[dict]:
    call = {"id": "c0", "type": "function", "function": {"name": "refund", "arguments": "{}"}}
    return [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": " ".join(["good"] * quality) or "done"},
    ]


class BiasedJudge:
    """A fake LLM: a candidate's quality is the number of "good" in it. Pairwise, it picks the first shown
    unless the second is better by 2 or more; in a group it adds 3 points to whatever it reads first."""

    name = "biased"

    def __init__(self, reply: str | None = None) -> None:
        self.calls = 0
        self.reply = reply

    def chat(self, conversations, sampling, n=1, seed=None, tools=None):
        out = []
        for conv in conversations:
            self.calls += 1
            text = conv[-1]["content"]
            blocks = re.split(r"Candidate [A-J]:\n", text)[1:]
            quality = [b.split("\n\n")[0].count("good") for b in blocks]
            if self.reply is not None:
                answer = self.reply
            elif "Reply with one letter" in text:
                answer = "B" if quality[1] >= quality[0] + 2 else "A"
            else:
                answer = "\n".join(
                    f"{'ABCDEFGHIJ'[i]}: {q + (3 if i == 0 else 0)}" for i, q in enumerate(quality)
                )
            out.append([Completion(answer, 1, "stop")])
        return out


QUALITIES = [3, 0, 4, 1]  # true levels: 4 > 3 > 1 > 0


def levels_of(order: list[int], judged: tuple[int, ...]) -> dict[int, int]:
    return {QUALITIES[i]: judged[pos] for pos, i in enumerate(order)}


def test_one_order_follows_position_both_orders_follow_quality():
    """One order only (a plain judge asked A vs B once per pair) is what position bias breaks; asked in both
    orders, the levels are the same whatever order the group comes in."""
    judge = EpisodeJudge(BiasedJudge(), mode="pairwise")
    seen = set()
    for order in itertools.permutations(range(4)):
        candidates = [episode(QUALITIES[i]) for i in order]
        (judged,) = judge.rank([(PROMPT, candidates)])
        seen.add(tuple(sorted(levels_of(list(order), judged).items())))
    # both orders: 4 beats 1 and 0 (by >= 2) and ties 3 (within 2); 3 beats 1 and 0; 1 and 0 tie:
    # wins 4: 2.5, 3: 2.5, 1: 0.5, 0: 0.5 -> levels 4, 3 best (tied), 1, 0 next (tied)
    assert seen == {((0, 1), (1, 1), (3, 0), (4, 0))}
    assert judge.asked == 24 * 12 and judge.unreadable == 0

    # asked once, the same judge names whichever of a close pair it reads first
    llm = BiasedJudge()
    for shown in ([3, 4], [4, 3]):
        conversation = judge._conversation(PROMPT, [episode(q) for q in shown])
        ((reply,),) = llm.chat([conversation], None)
        assert reply.text == "A"


def test_group_judging_over_rotations_cancels_a_bonus_for_the_first_shown():
    """Shown once, the bonus makes 3 beat 4 when 3 comes first; over the K rotations every candidate is
    first once, so each gains 3/K alike and the levels are the qualities' whatever the order."""
    judge = EpisodeJudge(BiasedJudge(), mode="group")
    for order in itertools.permutations(range(4)):
        (judged,) = judge.rank([(PROMPT, [episode(QUALITIES[i]) for i in order])])
        assert levels_of(list(order), judged) == {4: 0, 3: 1, 1: 2, 0: 3}
    assert judge.asked == 24 * 4 and judge.unreadable == 0
    ((reply,),) = BiasedJudge().chat([judge._conversation(PROMPT, [episode(3), episode(4)])], None)
    assert reply.text == "A: 6\nB: 4"  # one look: the first shown wins


def test_unreadable_replies_are_ties_and_counted():
    judge = EpisodeJudge(BiasedJudge(reply="I cannot decide."), mode="pairwise")
    (judged,) = judge.rank([(PROMPT, [episode(1), episode(3), episode(0)])])
    assert judged == (0, 0, 0) and judge.unreadable == 6
    with pytest.raises(Exception, match="groups of 2 to 10 candidates"):
        judge.rank([(PROMPT, [episode(1)])])


def test_agreement_with_people_is_the_hand_computed_share():
    judged = {1: (0, 1, 2), 2: (1, 0, 0), 3: (0, 1)}
    labels = {
        1: [("ann", (0, 1, 2)), ("bob", (2, 1, 0))],  # ann agrees on 3 of 3 pairs, bob on 0 of 3
        2: [("ann", (0, 1, 1))],  # pairs (0,1), (0,2) compared (judge ties 1-2): judge says 1,2 > 0: 0 of 2
        4: [("ann", (0, 1))],  # not judged: left out
    }
    report = judge_agreement(judged, labels)
    assert report["items"] == 2 and report["pairs"] == 8
    assert report["judge_vs_people"] == pytest.approx(3 / 8)
    assert report["per_annotator"] == {"ann": pytest.approx(3 / 5), "bob": 0.0}
    assert report["people_vs_people"] == 0.0 and report["people_items"] == 1  # ann and bob on item 1


def test_a_judge_is_measured_on_a_hand_built_database(tmp_path):
    """Two items of answers ranked by two people; the biased judge in both orders ranks by the count of
    "good" (ties within 1): figures equal the hand computation, and the CLI prints the people's own."""
    import json

    from tests.helpers import PASSWORD, make_project
    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.feedback import store
    from rlhfkit.feedback.judges import judge_database

    db = tmp_path / "fb.sqlite"
    items = [("Q1", ["good good good", "meh", "good"]), ("Q2", ["good good good good", "good"])]
    conn = make_project(db, items, overlap=2, users={"ann": "annotator", "bob": "annotator"})
    ann, bob = (store.authenticate(conn, name, PASSWORD).id for name in ("ann", "bob"))
    for user, item, ranks in ((ann, 1, [0, 2, 1]), (bob, 1, [2, 0, 1]), (ann, 2, [1, 0])):
        assert store.next_item(conn, user) == item  # assigned in id order
        assert store.submit(conn, user, item, f"s{user}-{item}", "rank", ranks) == store.Outcome.STORED
    report = judge_database(conn, EpisodeJudge(BiasedJudge(), mode="pairwise"))
    conn.close()
    # the judge, item 1 (3, 0 and 1 "good"): answer 0 wins its pairs in both orders (by >= 2); 1 and 2 are
    # within 1, so each is picked when shown first: a tie -> levels (0, 1, 1); item 2 (4 vs 1) -> (0, 1).
    # Compared pairs (the judge's tie 1-2 left out): ann, item 1: 0 > 1 and 0 > 2 agree; item 2: 1 > 0
    # against the judge -> 2 of 3. bob, item 1: 1 > 0 and 2 > 0, both against -> 0 of 2. In all 2 of 5.
    assert report["items"] == 2 and report["pairs"] == 5
    assert report["judge_vs_people"] == pytest.approx(2 / 5)
    assert report["per_annotator"] == {"ann": pytest.approx(2 / 3), "bob": 0.0}
    assert report["asked"] == 6 + 2 and report["unreadable"] == 0

    result = CliRunner().invoke(app, ["feedback", "agreement", "--db", str(db)])
    assert result.exit_code == 0, result.output
    people = json.loads(result.output)
    assert people["items"] == 1 and people["pairwise"] == 0.0  # ann and bob disagree on all 3 pairs
    bad = CliRunner().invoke(
        app, ["feedback", "agreement", "--db", str(db), "--judge", "x", "--mode", "both"]
    )
    assert bad.exit_code == 2 and "--mode must be pairwise or group, got 'both'" in bad.output
