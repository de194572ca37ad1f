"""Layer 3, models: every model loaded, built and saved (`loading`: causal LMs, reward and value models,
LoRA, the embedded default), the tiny random Llama of the tests (`tiny`), what differs between transformers
versions (`compat`), and forward passes that run each shared prompt once with per-token log-probs
(`prefix`).

`from rlhfkit.models import load_causal_lm` (the names of `loading`, this package's former single module)
keeps working.
"""

from rlhfkit import former_module

__getattr__ = former_module(__name__, "rlhfkit.models.loading")
