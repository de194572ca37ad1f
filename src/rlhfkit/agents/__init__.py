"""LLM agents: environments a model acts in through tools over several turns (`agents.env`), the
episode rollout, multi-turn RL on episode rewards and the AgentBench-style evaluation."""

from rlhfkit.agents.env import Environment, StepResult, Task
from rlhfkit.agents.registry import ENVIRONMENTS, load_environment

__all__ = ["ENVIRONMENTS", "Environment", "StepResult", "Task", "load_environment"]
