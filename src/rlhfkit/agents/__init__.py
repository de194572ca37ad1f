"""LLM agents: environments a model acts in through tools over several turns (`agents.env`), the
episode rollout, multi-turn RL on episode rewards and the AgentBench-style evaluation."""

from rlhfkit.agents.env import Environment, StepResult, Task

__all__ = ["Environment", "StepResult", "Task"]
