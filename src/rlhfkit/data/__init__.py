"""Layer 2, data: files read row by row (`files`), validated records and their settings (`records`),
tokenisation, padding and chat templates (`encoding`), tools and tool results rendered for a chat template
(`chat_tools`) and the one tool-call parser (`toolcalls`, which imports nothing of rlhfkit).

`from rlhfkit.data import load_prompts` (the names of `records`, this package's former single module)
keeps working.
"""

from rlhfkit import former_module

__getattr__ = former_module(__name__, "rlhfkit.data.records")
