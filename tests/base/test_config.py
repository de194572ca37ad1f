"""Config loading: a section's own defaults survive a partial override."""

from __future__ import annotations

import pytest

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import PipelineConfig
from rlhfkit.trainers.sft import SFTConfig


def test_setting_one_key_keeps_the_sections_other_defaults():
    cfg = load_config(SFTConfig, None, ["train.max_steps=3"])
    assert cfg.train.max_steps == 3
    assert cfg.train.lr == 2e-5 and cfg.train.epochs == 2.0  # SFT's own defaults, not TrainConfig's


def test_nested_sections_of_the_pipeline_keep_their_defaults():
    default = PipelineConfig()
    cfg = load_config(PipelineConfig, None, ["rl.ppo.train.max_steps=2", "rl.algorithm=grpo"])
    assert cfg.rl.algorithm == "grpo"
    assert cfg.rl.ppo.train.max_steps == 2
    assert cfg.rl.ppo.train.lr == default.rl.ppo.train.lr
    assert cfg.rl.ppo.ppo_epochs == default.rl.ppo.ppo_epochs != 4  # the pipeline's PPO, not PPOConfig()
    assert cfg.sft.train.epochs == default.sft.train.epochs


def test_scalar_for_a_list_setting_is_a_list_of_one_and_unknown_keys_fail():
    from rlhfkit.trainers.grpo import GRPOConfig

    assert load_config(GRPOConfig, None, ["reward=runs/rm"]).reward == ["runs/rm"]
    with pytest.raises(ConfigError, match=r"unknown setting 'rl.ppo.epochs'"):
        load_config(PipelineConfig, None, ["rl.ppo.epochs=3"])


def test_renamed_settings_still_work_with_a_deprecation_message(capsys: pytest.CaptureFixture[str]):
    from rlhfkit.trainers.grpo import GRPOConfig

    sft = load_config(SFTConfig, overrides=["data=demos.jsonl", "max_length=30", "eval_fraction=0"])
    assert (sft.data.path, sft.data.max_length, sft.data.eval_fraction) == ("demos.jsonl", 30, 0.0)
    assert sft.data.group_window == 16  # untouched settings of the section keep their defaults
    err = capsys.readouterr().err
    assert "setting 'max_length' is now 'data.max_length'" in err and "'data' is now 'data.path'" in err
    grpo = load_config(GRPOConfig, overrides=["max_new_tokens=8", "temperature=0.5"])
    assert (grpo.sampling.max_new_tokens, grpo.sampling.temperature) == (8, 0.5)
    nested = load_config(PipelineConfig, overrides=["sft.max_length=40", "rl.ppo.top_p=0.9"])
    assert nested.sft.data.max_length == 40 and nested.rl.ppo.sampling.top_p == 0.9
    assert "'sft.max_length' is now 'sft.data.max_length'" in capsys.readouterr().err
    # the new keys print nothing
    new = load_config(SFTConfig, overrides=["data.path=demos.jsonl", "data.max_length=30"])
    assert new.data.max_length == 30 and "deprecated" not in capsys.readouterr().err


def test_a_users_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    import sys

    from rlhfkit.config import import_spec

    (tmp_path / "my_rewards_xyz.py").write_text("def ok(prompts, completions, **fields):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert import_spec("my_rewards_xyz:ok", "reward_fn")([], []) == [1.0]
    with pytest.raises(ConfigError, match="reward_fn 'no_such_module_xyz:f'"):
        import_spec("no_such_module_xyz:f", "reward_fn")


def test_a_run_saved_before_a_setting_existed_resumes_while_that_setting_is_at_its_default(tmp_path):
    import yaml

    from rlhfkit.config import claim_run_dir, to_dict

    saved = to_dict(load_config(PipelineConfig, None, ["rl.grpo.train.lr=2e-4"]))
    del saved["sft"]["assistant_turns"], saved["rl"]["grpo"]["train"]["sharding"]  # not yet settings then
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    claim_run_dir(load_config(PipelineConfig, None, ["rl.grpo.train.lr=2e-4"]), tmp_path)  # no error
    with pytest.raises(ConfigError, match=r"sft.assistant_turns: None -> 'all'"):
        claim_run_dir(load_config(PipelineConfig, None, ["rl.grpo.train.lr=2e-4", "sft.assistant_turns=all"]),
                      tmp_path)  # fmt: skip
    with pytest.raises(ConfigError, match=r"rl.grpo.train.lr: 0.0002 -> 1e-05"):
        claim_run_dir(load_config(PipelineConfig, None, []), tmp_path)  # a saved setting changed
