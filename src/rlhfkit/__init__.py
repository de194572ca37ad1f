"""rlhfkit: align language models with human preferences (SFT -> reward model -> PPO/GRPO) on a CPU."""

__version__ = "0.1.0"
