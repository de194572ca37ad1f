"""Online feedback in step C: the reward model learns the labeler's preference from rankings of the policy's
groups, the labels are seeded per iteration, a resumed run equals an uninterrupted one, bad setups are
refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tests.conftest import write_jsonl

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.models.loading import build_reward_model, load_tokenizer, save_model, set_normalization
from rlhfkit.models.prefix import SharedPromptBatch
from rlhfkit.rewards.online import OnlineFeedbackConfig, OnlineRewardModel
from rlhfkit.trainers.grpo import ONLINE_RM_DIR, GRPOConfig, GRPOTrainer, run_grpo

pytestmark = pytest.mark.usefixtures("one_thread")


def count_a(prompt: str, answer: str) -> float:
    """The labeler's preference: more letters "a" is better."""
    return float(answer.count("a"))


@pytest.fixture(scope="module")
def tiny_rm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model, tokenizer = build_reward_model(str(tiny_model))
    set_normalization(model, 0.5, 2.0, "shift_scale")
    return save_model(model, tokenizer, tmp_path_factory.mktemp("rm"))


def online(tiny_rm: Path, **settings) -> OnlineRewardModel:
    cfg = OnlineFeedbackConfig(labeler="tests.rewards.test_online_feedback:count_a", **settings)
    from rlhfkit.device import resolve_runtime
    from rlhfkit.training.settings import TrainConfig

    return OnlineRewardModel(cfg, str(tiny_rm), resolve_runtime(TrainConfig()), seed=3)


def random_groups(rng: random.Random, tokenizer, groups: int, group: int):
    """`groups` prompts, each with `group` answers of 8 letters; the batch and the texts."""
    prompts = [f"Say {rng.randrange(100)}." for _ in range(groups) for _ in range(group)]
    answers = ["".join(rng.choice("abcde") for _ in range(8)) for _ in prompts]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    return SharedPromptBatch.build(ids, answer_ids, tokenizer.pad_token_id), prompts, answers


def test_panel_labels_are_the_labelers_order_up_to_seeded_noise(tiny_rm: Path):
    answers = ["aaa", "a", "aa", "b"] * 50  # 50 groups of 4, labeler order 0 > 2 > 1 > 3
    prompts = ["p"] * len(answers)
    clean = online(tiny_rm, flip_prob=0.0)
    panel, truth = clean.rank_groups(0, prompts, answers, 4)
    assert panel == truth == [0, 2, 1, 3] * 50
    noisy = online(tiny_rm, flip_prob=0.5)
    first, _ = noisy.rank_groups(7, prompts, answers, 4)
    assert first == noisy.rank_groups(7, prompts, answers, 4)[0]  # a resumed run gets the same labels
    assert first != noisy.rank_groups(8, prompts, answers, 4)[0]  # another iteration, other noise
    # each of the 3 adjacent swaps happens with probability 1/2: some groups keep the clean order
    groups = [tuple(first[i : i + 4]) for i in range(0, len(first), 4)]
    assert 0 < groups.count((0, 2, 1, 3)) < 50


def test_the_reward_model_learns_the_labelers_preference(tiny_rm: Path):
    rm = online(tiny_rm, flip_prob=0.0, lr=1e-3)
    tokenizer = load_tokenizer(str(tiny_rm))
    rng = random.Random(0)
    before = {k: v.clone() for k, v in rm.model.state_dict().items()}
    history = []
    for step in range(40):
        batch, prompts, answers = random_groups(rng, tokenizer, groups=8, group=4)
        history.append(rm.update(step, batch, prompts, answers, 4))
    # the accuracy is measured before each update, on answers it has not learned from: held out
    start = sum(h["rm_online_label_accuracy"] for h in history[:3]) / 3
    end = sum(h["rm_online_label_accuracy"] for h in history[-5:]) / 5
    assert start < 0.75 and end > 0.85, (start, end)
    assert any(not torch.equal(before[k], v) for k, v in rm.model.state_dict().items())
    # its scores are normalised with the constants it started from
    batch, _, _ = random_groups(rng, tokenizer, groups=1, group=4)
    raw = rm.score_batch(batch) * 2.0 + 0.5
    from rlhfkit.rewards.mix import shared_sequence_rewards

    with torch.no_grad():
        assert torch.allclose(raw, shared_sequence_rewards(rm.model, batch).float(), atol=1e-5)


def test_the_update_reuses_the_scoring_pass_and_takes_the_same_step(tiny_rm: Path):
    from rlhfkit.rewards.mix import reward_parts

    tokenizer = load_tokenizer(str(tiny_rm))
    batch, prompts, answers = random_groups(random.Random(1), tokenizer, groups=4, group=4)
    reused, fresh = online(tiny_rm, lr=1e-3), online(tiny_rm, lr=1e-3)
    passes = {"reused": 0, "fresh": 0}
    for name, rm in (("reused", reused), ("fresh", fresh)):
        decoder, _ = reward_parts(rm.model)
        decoder.register_forward_hook(lambda *_, name=name: passes.__setitem__(name, passes[name] + 1))
    reused.score_batch(batch)  # the trainer scores the rollout, then updates on the same rows
    trainer_batch = SharedPromptBatch(*(t.clone() for t in vars(batch).values()))  # its own batch object
    stats = reused.update(0, trainer_batch, prompts, answers, 4)
    want = fresh.update(0, batch, prompts, answers, 4)  # nothing was scored: the pass is run anew
    assert passes["reused"] == passes["fresh"] > 0  # scoring + update ran the model as often as an update
    assert stats["rm_online_loss"] == pytest.approx(want["rm_online_loss"], abs=1e-6)
    assert stats["rm_online_label_accuracy"] == want["rm_online_label_accuracy"]
    for (name, a), b in zip(reused.model.named_parameters(), fresh.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # a kept pass is handed out once, and only for the rows it scored
    other, _, _ = random_groups(random.Random(2), tokenizer, groups=4, group=4)
    reused.score_batch(batch)
    assert reused.take_scoring_pass(other) is None and reused.take_scoring_pass(batch) is None
    reused.score_batch(batch)
    assert reused.take_scoring_pass(batch) is not None


def test_a_batch_of_ties_is_no_update(tiny_rm: Path):
    rm = online(tiny_rm)
    tokenizer = load_tokenizer(str(tiny_rm))
    before = {k: v.clone() for k, v in rm.model.state_dict().items()}
    prompt = tokenizer("Say.", add_special_tokens=False)["input_ids"]
    answer = tokenizer("bbb", add_special_tokens=False)["input_ids"]
    batch = SharedPromptBatch.build([prompt] * 4, [answer] * 4, tokenizer.pad_token_id)
    stats = rm.update(0, batch, ["Say."] * 4, ["bbb"] * 4, 4)
    assert stats == {"rm_online_pairs": 0.0}
    assert all(torch.equal(before[k], v) for k, v in rm.model.state_dict().items())


def prompts_file(tmp_path: Path, n: int = 8) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"Write {i}."}]} for i in range(n)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def grpo_config(tiny_model: Path, tiny_rm: Path, tmp_path: Path, out: str, *sets: str) -> GRPOConfig:
    base = [
        f"policy={tiny_model}", f"prompts={prompts_file(tmp_path)}", f"output={tmp_path / out}",
        f"reward=[{tiny_rm}]", "online_feedback.labeler=tests.rewards.test_online_feedback:count_a",
        "online_feedback.lr=1e-3", "sampling.max_new_tokens=8", "sampling.temperature=1.0",
        "prompts_per_step=2", "num_generations=4", "sample_every=0", "train.lr=1e-3", "train.save_every=0",
    ]  # fmt: skip
    return load_config(GRPOConfig, None, base + list(sets))


@pytest.mark.slow
def test_grpo_with_online_feedback_resumes_exactly(tiny_model: Path, tiny_rm: Path, tmp_path: Path):
    from safetensors.torch import load_file

    cfg = grpo_config(tiny_model, tiny_rm, tmp_path, "a", "train.max_steps=4")
    run_grpo(cfg)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 4 and all("rm_online_accuracy" in r for r in train if r["rm_online_pairs"] > 0)
    start = load_file(str(tiny_rm / "model.safetensors"))
    end = load_file(str(tmp_path / "a" / ONLINE_RM_DIR / "model.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the reward model learned
    assert (
        json.loads((tmp_path / "a" / ONLINE_RM_DIR / "config.json").read_text())["rlhfkit_reward_scale"]
        == 2.0
    )

    class Stop(Exception):
        pass

    def crash(loop, metrics):
        if loop.step == 3:
            raise Stop

    # b also watches the labeler as its gold, whose scores the labels then reuse: the same labels
    cfg = grpo_config(
        tiny_model, tiny_rm, tmp_path, "b", "train.max_steps=4", "train.save_every=2",
        "gold=tests.rewards.test_online_feedback:count_a",
    )  # fmt: skip
    from rlhfkit.trainers.rl import load_rl_prompts

    trainer = GRPOTrainer(cfg, load_rl_prompts(cfg), None)
    trainer.callbacks.append(crash)
    with pytest.raises(Stop):
        trainer.run()
    run_grpo(cfg)  # resumes at iteration 2: the reward model's weights and moments come back too
    for name in ("model.safetensors", f"{ONLINE_RM_DIR}/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_online_feedback_refuses_what_it_cannot_train(tiny_model: Path, tiny_rm: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="exactly one --reward"):
        run_grpo(grpo_config(tiny_model, tiny_rm, tmp_path, "x", f"reward=[{tiny_rm},{tiny_rm}]"))
    with pytest.raises(RlhfkitError, match="not a reward model"):
        run_grpo(grpo_config(tiny_model, tiny_rm, tmp_path, "y", f"reward=[{tiny_model}]"))
    with pytest.raises(ConfigError, match="online_feedback"):
        run_grpo(grpo_config(tiny_model, tiny_rm, tmp_path, "z", "reward=[]", "env=calc"))
    with pytest.raises(ConfigError, match="reward_weights"):
        run_grpo(grpo_config(tiny_model, tiny_rm, tmp_path, "w", "reward_weights=[1.0,2.0]"))
    assert not any((tmp_path / d).exists() for d in "xyzw")
