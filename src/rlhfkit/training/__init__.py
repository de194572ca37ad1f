"""Layer 6, training: what every trainer runs on. The run's settings, seeding, schedule and data order
(`settings`), the one training loop (`loop`), the guards every optimizer step goes through (`guard`),
atomic checkpoints (`checkpoint`), RL health checks (`health`) and RL experience with its samplers
(`experience`).

`from rlhfkit.training import TrainConfig` (the names of `settings`, this package's former single module)
keeps working.
"""

from rlhfkit import former_module

__getattr__ = former_module(__name__, "rlhfkit.training.settings")
