"""Write the bundled tool-use demonstrations (rlhfkit/assets/agents/{calc,db}_demos.jsonl) from train tasks.

    PYTHONPATH=src python scripts/make_agent_demos.py

Deterministic: the tasks come from fixed seeds, the tool results from the environments themselves.
"""

from __future__ import annotations

from rlhfkit.agents.demos import demos_path, write_demos
from rlhfkit.agents.registry import load_environment

if __name__ == "__main__":
    for name in ("calc", "db"):
        path = demos_path(name)
        count = write_demos(load_environment(name), path)
        print(f"{path}: {count} demonstrations")
