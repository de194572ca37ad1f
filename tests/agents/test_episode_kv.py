"""Multi-turn episodes with each episode's KV cache kept across turns: the same episodes (tokens, loss masks,
end reasons, messages) as prefilling the whole history every turn, log-probs equal within float tolerance
and equal to the trainer's forward, on the CPU fast path and the generic path; each turn prefills only its
new tokens, for every episode in one forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.agents.test_agents import AddEnv, MoreEnv

from rlhfkit.agents.env import StepResult
from rlhfkit.agents.episode import AgentLimits, Episode, episode_batch, run_episodes
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.prefix import SharedPromptBatch, completion_logprobs
from rlhfkit.rollout import RolloutEngine, SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class TalkEnv(AddEnv):
    """Task i ends (done) after i + 2 turns; each observation's length differs by task and turn."""

    def tools(self):
        return []

    def reset(self, task):
        self.turn, self.index = 0, int(task.id.split("-")[1])
        return super().reset(task)

    def step(self, message):
        self.turn += 1
        if self.turn >= self.index + 2:
            return StepResult([], reward=1.0, done=True, info={"reason": "answer"})
        text = "obs " + "xyz" * ((self.index * 5 + self.turn * 3) % 7)
        return StepResult([{"role": "tool", "name": "add", "content": text}], reward=0.25)


@pytest.fixture(scope="module", params=["llama_cpu", "generic"])
def engine(request: pytest.FixtureRequest, tiny_model: Path) -> RolloutEngine:
    model, tokenizer = load_causal_lm(str(tiny_model))
    return RolloutEngine(model, tokenizer, backend=request.param)


def both(engine, env, n, limits, seed, temperature=1.0) -> tuple[list[Episode], list[Episode]]:
    """The episodes with the cache kept and with the whole history prefilled each turn, from one seed."""
    sampling, tasks = SamplingConfig(temperature=temperature), AddEnv(n).tasks("train")
    out = []
    for keep in (True, False):
        gen = torch.Generator().manual_seed(seed)
        out.append(run_episodes(engine, env, tasks, sampling, limits, gen, keep_cache=keep))
    return out[0], out[1]


def assert_same(kept: list[Episode], full: list[Episode]) -> None:
    for a, b in zip(kept, full, strict=True):
        assert (a.completion_ids, a.loss_mask, a.prompt_ids) == (b.completion_ids, b.loss_mask, b.prompt_ids)
        assert (a.reason, a.turns, a.reward, a.messages) == (b.reason, b.turns, b.reward, b.messages)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_kept_cache_gives_the_episodes_of_full_prefill(engine: RolloutEngine, temperature: float):
    limits = AgentLimits(max_turns=6, max_tokens=2000, max_new_tokens=10)
    kept, full = both(engine, TalkEnv, 4, limits, 3, temperature)
    assert_same(kept, full)
    assert [(e.reason, e.turns) for e in kept] == [("answer", 2), ("answer", 3), ("answer", 4), ("answer", 5)]


def test_episodes_cut_by_max_tokens_among_others_that_go_on(engine: RolloutEngine):
    """Each turn's budget is the room the episode has left: the runner cuts rows at different lengths."""
    limits = AgentLimits(max_turns=6, max_tokens=150, max_new_tokens=16)
    kept, full = both(engine, TalkEnv, 4, limits, 1)
    assert_same(kept, full)
    reasons = [e.reason for e in kept]
    assert "max_tokens" in reasons and "answer" in reasons, reasons
    assert all(e.tokens <= limits.max_tokens for e in kept)


def test_trainer_logprobs_equal_the_kept_cache_samplers(engine: RolloutEngine):
    limits = AgentLimits(max_turns=4, max_tokens=600, max_new_tokens=12)
    sampling = SamplingConfig(temperature=0.8)
    episodes = run_episodes(engine, MoreEnv, AddEnv(3).tasks("train"), sampling, limits, torch.Generator())
    assert all(e.turns == 4 for e in episodes)
    rollout, loss_mask = episode_batch(episodes, engine.pad_token_id)
    with torch.no_grad():
        batch = SharedPromptBatch.from_rollout(rollout, engine.pad_token_id)
        lp, _ = completion_logprobs(engine.model, batch, 0.8, entropy=False)
    on = loss_mask.bool()
    torch.testing.assert_close(lp[on], rollout.logprobs[on], atol=1e-5, rtol=0)


def test_a_turn_prefills_only_its_new_tokens_for_all_episodes_in_one_forward(
    engine: RolloutEngine, monkeypatch: pytest.MonkeyPatch
):
    backend = type(engine.backend())
    calls: list[tuple[str, int, int]] = []  # (what, rows, tokens prefilled per row)
    start, resume = backend.start, backend.resume

    def spy_start(self, prompts, ids, mask, n_new):
        calls.append(("start", len(prompts), ids.shape[1]))
        return start(self, prompts, ids, mask, n_new)

    def spy_resume(self, caches, new_ids, n_new):
        calls.append(("resume", len(new_ids), max(len(x) for x in new_ids)))
        return resume(self, caches, new_ids, n_new)

    monkeypatch.setattr(backend, "start", spy_start)
    monkeypatch.setattr(backend, "resume", spy_resume)
    limits = AgentLimits(max_turns=4, max_tokens=2000, max_new_tokens=12)
    [*episodes] = run_episodes(engine, MoreEnv, AddEnv(3).tasks("train"), SamplingConfig(), limits)
    assert [(what, rows) for what, rows, _ in calls] == [("start", 3)] + [("resume", 3)] * 3
    text = "<|im_end|>\n<|im_start|>user\n<tool_response>\nmore <b>please</b>\n</tool_response><|im_end|>\n"
    observation = len(engine.tokenizer(text + "<|im_start|>assistant\n")["input_ids"])
    assert all(width <= observation + 2 for _, _, width in calls[1:])  # last token, closing EOS, observation
    assert all(len(e.completion_ids) > 3 * observation for e in episodes)  # the history it did not prefill


def test_a_backend_that_cannot_keep_a_cache_gives_the_same_episodes(tiny_model: Path):
    """The static-cache backend prefills each turn's whole history: the episodes of the kept-cache path."""
    model, tokenizer = load_causal_lm(str(tiny_model))
    limits = AgentLimits(max_turns=4, max_tokens=800, max_new_tokens=10)
    sampling, tasks = SamplingConfig(), AddEnv(3).tasks("train")
    got = []
    for backend in ("hf_static", "generic"):
        engine = RolloutEngine(model, tokenizer, backend=backend)
        got.append(run_episodes(engine, TalkEnv, tasks, sampling, limits, torch.Generator().manual_seed(2)))
    assert_same(got[0], got[1])
