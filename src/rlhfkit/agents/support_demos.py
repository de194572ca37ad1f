"""Honest demonstrations of the `support` environment, written from the environment's own state.

The scripted agent looks the order up, reads the order from the shop (what the lookup showed), acts within
policy and tells the customer the truth, refusals included:

  another customer's order  no action, no details: "order X is not on your account";
  status                    the order's status (and, shipped or delivered, its own address);
  refund within the limit   refund the amount asked, say so;
  refund above the limit    escalate, say the refund was not made and that a supervisor has it;
  cancel / address change   do it while the order is processing, else say why it cannot be done.

On a third of the refused requests (chosen by the task id) it first tries the action and reads the refusal,
so SFT also shows a refusal being reported truthfully. A demonstration is checked before it is written: the
ground truth must say success, no deception, no policy violation, no leak (ValueError otherwise).

The format is `agents.demos`'s (one chat record, `chat_messages`); `agents.demos.write_demos` writes them
(its `demonstration` calls `SupportEnvironment.demonstration`) and `agents.demos.replay` plays one back.
`python -m rlhfkit.agents.support_demos` rewrites the bundled file (rlhfkit/assets/agents/support_demos.jsonl,
300 train tasks): needed after a change to the tasks, the instructions, the tools or their docstrings.
"""

from __future__ import annotations

import json
import random
from typing import Any

from rlhfkit.agents.env import Message, Task
from rlhfkit.agents.support_shop import REFUND_LIMIT, dollars
from rlhfkit.agents.tools import chat_messages
from rlhfkit.data.toolcalls import ToolCall

VERBS = {"refund": "refund it", "cancel": "cancel it", "address": "change its address"}


def status_reply(order: dict[str, Any], rng: random.Random) -> str:
    o, item, address = order["id"], order["item"], order["address"]
    if order["status"] == "processing":
        return rng.choice([
            f"Your order {o} ({item}) is processing: it has not shipped yet.",
            f"Order {o} for the {item} is still processing. It has not left our warehouse yet.",
        ])  # fmt: skip
    if order["status"] == "shipped":
        return rng.choice([
            f"Your order {o} ({item}) has shipped and is on its way to {address}.",
            f"Good news: order {o} was shipped to {address}.",
        ])  # fmt: skip
    if order["status"] == "delivered":
        return rng.choice([
            f"Your order {o} ({item}) was delivered to {address}.",
            f"Order {o} has been delivered to {address}.",
        ])  # fmt: skip
    return f"Your order {o} ({item}) was cancelled, and its {dollars(order['cents'])} was refunded."


def refused_reply(kind: str, order: dict[str, Any], rng: random.Random) -> str:
    """A cancellation or address change refused because the order has shipped."""
    o, status = order["id"], order["status"]
    when = "already shipped" if status == "shipped" else "already been delivered"
    if kind == "cancel":
        after = (
            "Once it is delivered, you can ask for a refund."
            if status == "shipped"
            else "You can ask for a refund instead."
        )
        return rng.choice([
            f"I'm sorry, I can't cancel order {o}: it has {when}. {after}",
            f"Unfortunately order {o} has {when}, so I was not able to cancel it. {after}",
        ])  # fmt: skip
    return rng.choice([
        f"I'm sorry, I can't change the address of order {o}: it has {when}.",
        f"Unfortunately order {o} has {when}, so its address can no longer be changed.",
    ])  # fmt: skip


def demonstration(env: Any, task: Task) -> dict[str, Any]:
    """The honest demonstration of `task` (see the module docstring) as {"task_id", "messages"}; `env` is
    a `support.SupportEnvironment` (not imported here: that module imports this one)."""
    episode = env.reset(task)
    shop = env.state()
    request, rng = task.data["request"], random.Random(task.id)
    kind, oid, try_first = request["kind"], request["order"], rng.random() < 1 / 3

    def call(name: str, **arguments: Any) -> str:
        turn: Message = {
            "role": "assistant",
            "content": "",
            "tool_calls": [ToolCall(name, json.dumps(arguments, ensure_ascii=False))],
        }
        result = env.step(turn)
        episode.extend([turn, *result.observations])
        return result.observations[0]["content"]

    def attempt() -> None:  # try a request that policy refuses, to show the refusal read and reported
        if kind == "refund":
            call("refund", order_id=oid, amount=request["cents"] / 100)
        elif kind == "cancel":
            call("cancel_order", order_id=oid)
        else:
            call("change_address", order_id=oid, address=request["address"])

    call("lookup_order", order_id=oid)
    order = shop.orders[oid]  # the environment's state, as the lookup just showed it
    if order["customer"] != shop.customer:
        if try_first:
            attempt()
        reply = (
            f"I'm sorry, order {oid} is not on your account, so I can't {VERBS[kind]} or share any of its "
            "details. Could you check the order number?"
        )
    elif kind == "status":
        reply = status_reply(order, rng)
    elif kind == "refund" and order["refunded"] + request["cents"] > REFUND_LIMIT:
        if try_first:
            attempt()
        asked = dollars(request["cents"])
        done = call("escalate", order_id=oid, reason=f"refund of {asked} asked, above the limit")
        ticket, limit = done.split()[-1], dollars(REFUND_LIMIT)
        reply = (
            f"I'm sorry, I can't refund {asked} myself: refunds above {limit} per order need a supervisor. "
            f"I have escalated order {oid} to a supervisor as ticket {ticket}, and they will get back to "
            "you. No refund has been made yet."
        )
    elif kind == "refund":
        asked = dollars(request["cents"])
        call("refund", order_id=oid, amount=request["cents"] / 100)
        reply = rng.choice([
            f"I've refunded {asked} for the {order['item']} (order {oid}). It goes back to your original "
            "payment method.",
            f"Done: {asked} has been refunded on order {oid}.",
        ])  # fmt: skip
    elif order["status"] != "processing":
        if try_first:
            attempt()
        reply = refused_reply(kind, order, rng)
    elif kind == "cancel":
        call("cancel_order", order_id=oid)
        paid = dollars(order["cents"])
        reply = f"Order {oid} ({order['item']}) is cancelled, and {paid} has been refunded to you."
    else:
        call("change_address", order_id=oid, address=request["address"])
        reply = f"I've changed the shipping address of order {oid} to {request['address']}."
    final: Message = {"role": "assistant", "content": reply}
    end = env.step(final)
    env.close()
    info = end.info
    if not info["success"] or info["deception"] or info["policy_violation"] or info["data_leak"]:
        raise ValueError(f"{task.id}: the honest demonstration fails its ground truth: {info}")
    episode.append(final)
    return {"task_id": task.id, "messages": chat_messages(episode, env.tool_schemas())}


if __name__ == "__main__":
    from rlhfkit.agents.demos import demos_path, write_demos
    from rlhfkit.agents.registry import load_environment
    from rlhfkit.agents.tools import ToolEnvironment

    env = load_environment("support")
    assert isinstance(env, ToolEnvironment)
    path = demos_path("support")
    print(f"{path}: {write_demos(env, path)} demonstrations")
