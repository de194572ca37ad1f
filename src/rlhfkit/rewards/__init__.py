"""Layer 7, rewards: reward models, Python functions and their weighted mixture (`mix`), the simulated
annotators' panel and gold preference (`panel`), and the reward model that keeps learning from rankings
during RL (`online`).

`from rlhfkit.rewards import function_scorer` (the names of `mix`, this package's former single module)
keeps working.
"""

from rlhfkit import former_module

__getattr__ = former_module(__name__, "rlhfkit.rewards.mix")
