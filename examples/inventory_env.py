"""An agent environment in 20 lines: the model looks up the shop's stock with a tool and answers.

rlhfkit agent-eval --policy runs/sft --envs examples.inventory_env:Inventory
rlhfkit grpo --policy runs/sft --env examples.inventory_env:Inventory --output runs/inventory
"""

from rlhfkit.agents import Task
from rlhfkit.agents.answers import last_number, numbers_match
from rlhfkit.agents.tools import ToolEnvironment

STOCK = {"apples": 12, "pears": 7, "plums": 30, "figs": 4, "limes": 19, "dates": 55}


def stock(item: str) -> str:
    """How many of an item the shop has.

    Args:
        item: The item, e.g. "apples".
    """
    return str(STOCK.get(item.strip().lower(), 0))


class Inventory(ToolEnvironment):
    name = "inventory"

    def tools(self):
        return [stock]

    def tasks(self, split):
        items = sorted(STOCK.items())[:4] if split == "train" else sorted(STOCK.items())[4:]
        return [Task(f"{split}-{i}", f"How many {i} does the shop have?", {"answer": n}) for i, n in items]

    def instructions(self, task):
        return "You answer questions about the shop's stock. Look it up with the stock tool, then reply."

    def check(self, task, answer):
        return float(numbers_match(last_number(answer), task.data["answer"]))
