"""`calc`: arithmetic word problems solved with a calculator tool.

The problems (shopping, travel, wages, recipes, fuel, savings, stock, bills, grades, building) need
multi-digit multiplication, several steps, percentages or division with decimals: more than a 135M model
does in its head, one `calculator` call with the right expression. They come from templates filled from a
seeded `random.Random`, so a split is the same on every machine; every answer is an exact decimal (a problem
whose answer needs more than 4 decimals, or more than 2 for dollars, is drawn again). The test split (200)
uses other seeds than train (2,000) and any train problem whose text equals a test problem is dropped.

The calculator evaluates an expression over Python's `ast`: numbers, + - * / // % ** (^ is read as **, a
number followed by % and no operand as a percentage, "1,234.5" and "$12" as numbers), parentheses and unary
signs, nothing else (no names, no calls, no attributes). It computes with exact
fractions (0.1 + 0.2 is 0.3), falls back to floats only for a fractional power, and refuses expressions
longer than 300 characters, with more than 100 nodes, exponents above 1000 or results above ~300 digits.

The answer is correct when its last number equals the gold within 1e-6 relative ("1,234.5", "$12", "12.50").
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import random
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any, cast

from rlhfkit.agents.answers import last_number, numbers_match
from rlhfkit.agents.env import Split, Task, generated_split
from rlhfkit.agents.tools import ToolEnvironment

MAX_LENGTH, MAX_NODES, MAX_EXPONENT, MAX_BITS = 300, 100, 1000, 1000
SIZES = {"train": 2000, "test": 200}

Number = Fraction | float
BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class CalcError(ValueError):
    """An expression the calculator refuses; the message is shown to the agent."""


def bounded(value: Number) -> Number:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalcError("the result is not a finite number")
        if abs(value) > 1e300:
            raise CalcError("the result is too large")
        return value
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise CalcError("the result is too large (more than ~300 digits)")
    return value


def power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:  # type: ignore[operator]  # typeshed: abs() of Fraction | float is object
        raise CalcError(f"the exponent {render(exponent)} is too large (at most {MAX_EXPONENT})")
    if isinstance(base, Fraction) and isinstance(exponent, Fraction) and exponent.denominator == 1:
        size = max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(int(exponent))
        if size > MAX_BITS:
            raise CalcError("the result is too large (more than ~300 digits)")
        if base == 0 and exponent < 0:
            raise CalcError("division by zero")
        return base ** int(exponent)
    try:
        result = float(base) ** float(exponent)
    except (OverflowError, ZeroDivisionError) as exc:
        raise CalcError(f"cannot compute the power: {exc}") from None
    if isinstance(result, complex):
        raise CalcError("a negative number to a fractional power is not a real number")
    return result


def evaluate(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        number = cast(float, node.value)  # an int or a float, as just checked
        return bounded(Fraction(repr(number)) if math.isfinite(number) else float(number))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and (type(node.op) in BINARY or isinstance(node.op, ast.Pow)):
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return bounded(power(left, right))
        if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            raise CalcError("division by zero")
        return bounded(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Name):
        raise CalcError(f"names are not allowed ('{node.id}'): write numbers only")
    if isinstance(node, ast.Call):
        raise CalcError("function calls are not allowed: use + - * / // % ** and parentheses")
    raise CalcError(f"'{type(node).__name__}' is not allowed: use numbers, + - * / // % ** and parentheses")


def render(value: Number) -> str:
    """An exact decimal when the value has one within 12 places, else 12 significant digits."""
    if isinstance(value, Fraction):
        if value.denominator == 1:
            return str(value.numerator)
        places = decimal_places(value)
        if places is not None and places <= 12:
            digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
            text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")
            return f"-{text}" if value < 0 else text
        value = float(value)
    text = f"{value:.12g}"
    return text


def decimal_places(value: Fraction) -> int | None:
    """How many decimals `value` needs, or None if its decimal does not terminate."""
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    return max(twos, fives) if d == 1 else None


def compute(expression: str) -> Number:
    """The value of an arithmetic expression; CalcError says why it is refused."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").replace("$", "")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators: 1,234.5
    text = re.sub(r"(\d+(?:\.\d+)?)\s*%(?!\s*[\d(.])", r"(\1/100)", text)  # 15% is 0.15; 7 % 3 stays modulo
    if not text:
        raise CalcError("the expression is empty")
    if len(text) > MAX_LENGTH:
        raise CalcError(f"the expression is too long (at most {MAX_LENGTH} characters)")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalcError(
            f"cannot read the expression {expression!r}: write e.g. (12.5 + 3) * 4 / 100"
        ) from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalcError(f"the expression is too long (at most {MAX_NODES} parts)")
    try:
        return evaluate(tree)
    except (ZeroDivisionError, OverflowError) as exc:
        raise CalcError(str(exc)) from None


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "(37 * 4.25 + 12) * 0.85".
    """
    try:
        return render(compute(expression))
    except CalcError as exc:
        return f"error: {exc}"


# ------------------------------------------------------------------------------------------ problems

NAMES = [
    "Maria",
    "Ahmed",
    "Lena",
    "Tom",
    "Priya",
    "Kenji",
    "Sofia",
    "Omar",
    "Grace",
    "Lucas",
    "Aisha",
    "Ivan",
]
ITEMS = [
    ("notebooks", 2, 9),
    ("pens", 1, 4),
    ("shirts", 12, 40),
    ("books", 8, 30),
    ("mugs", 4, 15),
    ("lamps", 18, 60),
    ("chairs", 25, 120),
    ("candles", 3, 12),
    ("plants", 6, 35),
    ("towels", 5, 22),
]
CITIES = ["Lyon", "Porto", "Denver", "Osaka", "Krakow", "Austin", "Bergen", "Seville", "Quebec", "Perth"]


def price(rng: random.Random, low: int, high: int) -> str:
    return f"{rng.randint(low, high - 1)}.{rng.choice(['25', '50', '75', '99', '45', '10', '80'])}"


def shopping(rng: random.Random) -> tuple[str, str]:
    (a, la, ha), (b, lb, hb) = rng.sample(ITEMS, 2)
    na, nb, pa, pb, d = (
        rng.randint(3, 48),
        rng.randint(2, 36),
        price(rng, la, ha),
        price(rng, lb, hb),
        rng.choice([5, 10, 15, 20, 25, 30]),
    )
    who = rng.choice(NAMES)
    text = rng.choice(
        [
            f"{who} buys {na} {a} at ${pa} each and {nb} {b} at ${pb} each. The shop gives a {d}% discount on the whole purchase. How much does {who} pay, in dollars?",  # noqa: E501
            f"A school orders {na} {a} costing ${pa} apiece and {nb} {b} costing ${pb} apiece, and gets {d}% off the total. What is the final bill in dollars?",  # noqa: E501
        ]
    )
    return text, f"({na} * {pa} + {nb} * {pb}) * (100 - {d}) / 100"


def travel(rng: random.Random) -> tuple[str, str]:
    s1, s2, h1, h2 = (
        rng.randint(47, 118),
        rng.randint(38, 112),
        rng.choice([1.5, 2.25, 3.75, 2.5, 4.5, 1.25]),
        rng.choice([0.75, 1.5, 2.5, 3.25, 2.75]),
    )
    c1, c2 = rng.sample(CITIES, 2)
    text = rng.choice(
        [
            f"A bus leaves {c1} and drives at {s1} km/h for {h1} hours, then at {s2} km/h for {h2} hours to reach {c2}. How many kilometres does it travel in total?",  # noqa: E501
            f"On a road trip from {c1} to {c2}, a family drives {h1} hours at an average of {s1} km/h and then {h2} hours at {s2} km/h. What is the total distance in km?",  # noqa: E501
        ]
    )
    return text, f"{s1} * {h1} + {s2} * {h2}"


def wages(rng: random.Random) -> tuple[str, str]:
    rate, hours, weeks, tax = (
        price(rng, 14, 58),
        rng.randint(18, 46),
        rng.randint(3, 26),
        rng.choice([10, 12, 15, 18, 20, 22, 25]),
    )
    who = rng.choice(NAMES)
    text = rng.choice(
        [
            f"{who} earns ${rate} per hour and works {hours} hours a week for {weeks} weeks. After {tax}% tax is taken off, how much does {who} take home, in dollars?",  # noqa: E501
            f"A contractor is paid ${rate} an hour for {hours} hours every week. {tax}% of the pay goes to tax. What is the pay after tax over {weeks} weeks, in dollars?",  # noqa: E501
        ]
    )
    return text, f"{rate} * {hours} * {weeks} * (100 - {tax}) / 100"


def recipe(rng: random.Random) -> tuple[str, str]:
    serves, wanted = rng.choice([4, 5, 8, 10, 16, 20, 25]), rng.randint(7, 140)
    grams, what = rng.randint(115, 2480), rng.choice(["flour", "rice", "sugar", "butter", "lentils", "pasta"])
    text = rng.choice(
        [
            f"A recipe uses {grams} grams of {what} to serve {serves} people. How many grams of {what} are needed to serve {wanted} people?",  # noqa: E501
            f"A canteen cooks for {wanted} guests with a recipe written for {serves} that calls for {grams} g of {what}. How many grams of {what} does the canteen need?",  # noqa: E501
        ]
    )
    return text, f"{grams} * {wanted} / {serves}"


def fuel(rng: random.Random) -> tuple[str, str]:
    use, km, cost = (
        rng.choice(["5.5", "6.4", "7.2", "8.5", "9.6", "4.8"]),
        rng.randint(120, 2450),
        price(rng, 1, 3),
    )
    text = rng.choice(
        [
            f"A car uses {use} litres of fuel per 100 km. Fuel costs ${cost} per litre. What does fuel for a {km} km trip cost, in dollars?",  # noqa: E501
            f"A delivery van needs {use} L per 100 km and drives {km} km this week. At ${cost} a litre, how much does the week's fuel cost in dollars?",  # noqa: E501
        ]
    )
    return text, f"{use} * {km} / 100 * {cost}"


def savings(rng: random.Random) -> tuple[str, str]:
    start, monthly, months, rate = (
        rng.randint(350, 9800),
        rng.randint(45, 875),
        rng.randint(6, 48),
        rng.choice([2, 3, 4, 5, 6]),
    )
    who = rng.choice(NAMES)
    text = (
        f"{who} has ${start} saved and adds ${monthly} every month for {months} months. At the end the bank "
        f"adds a one-time bonus of {rate}% of the balance. How much money does {who} have then, in dollars?"
    )
    return text, f"({start} + {monthly} * {months}) * (100 + {rate}) / 100"


def stock(rng: random.Random) -> tuple[str, str]:
    boxes, per, sold, returned = (
        rng.randint(23, 189),
        rng.randint(12, 64),
        rng.randint(300, 2900),
        rng.randint(5, 90),
    )
    item = rng.choice(["bolts", "apples", "bottles", "cables", "tiles", "cans"])
    text = rng.choice(
        [
            f"A warehouse receives {boxes} boxes with {per} {item} in each. It ships {sold} {item} and {returned} are returned. How many {item} are in the warehouse now?",  # noqa: E501
            f"A shop stocks {boxes} crates of {per} {item}. Customers buy {sold} {item}, then bring back {returned}. How many {item} does the shop have?",  # noqa: E501
        ]
    )
    return text, f"{boxes} * {per} - {sold} + {returned}"


def bill(rng: random.Random) -> tuple[str, str]:
    people, tip = rng.choice([2, 4, 5, 8, 10, 16, 20, 25]), rng.choice([10, 12, 15, 18, 20])
    total = price(rng, 40, 960)
    text = rng.choice(
        [
            f"{people} friends eat out. The bill is ${total} and they add a {tip}% tip, then split the total equally. How much does each person pay, in dollars?",  # noqa: E501
            f"A team dinner costs ${total} before a {tip}% tip. The {people} colleagues share the cost with the tip equally. What is each share in dollars?",  # noqa: E501
        ]
    )
    return text, f"{total} * (100 + {tip}) / 100 / {people}"


def grades(rng: random.Random) -> tuple[str, str]:
    scores = [rng.randint(48, 100) for _ in range(rng.choice([4, 5, 8]))]
    who = rng.choice(NAMES)
    listed = f"{', '.join(map(str, scores[:-1]))} and {scores[-1]}"
    text = f"{who}'s test scores are {listed}. What is the average score?"
    return text, f"({' + '.join(map(str, scores))}) / {len(scores)}"


def building(rng: random.Random) -> tuple[str, str]:
    length, width, cost = (
        rng.choice(["12.5", "18.4", "23.75", "31.2", "9.6", "42.5"]),
        rng.randint(7, 64),
        price(rng, 14, 95),
    )
    what = rng.choice(["floor tiles", "carpet", "paving", "parquet"])
    text = (
        f"A room is {length} m long and {width} m wide. Covering it with {what} costs "
        f"${cost} per square metre. How much does it cost to cover the whole floor, in dollars?"
    )
    return text, f"{length} * {width} * {cost}"


def factory(rng: random.Random) -> tuple[str, str]:
    per_day, days, defect = rng.randint(12, 98) * 100, rng.randint(23, 365), rng.choice([1, 2, 4, 5, 8])
    item = rng.choice(["bolts", "phone cases", "bottles", "bricks", "chips"])
    text = (
        f"A factory makes {per_day} {item} a day for {days} days. {defect}% of them are faulty and "
        f"thrown away. How many good {item} are made?"
    )
    return text, f"{per_day} * {days} * (100 - {defect}) / 100"


def growth(rng: random.Random) -> tuple[str, str]:
    first, second = rng.choice([2, 4, 5, 8, 10]), rng.choice([5, 10, 20, 25])
    population = (
        rng.randint(3, 240) * 10000 // math.gcd(10000, (100 + first) * (100 + second))
    )  # whole people
    city = rng.choice(CITIES)
    text = (
        f"{city} has {population} residents. The population grows by {first}% in the first year and by "
        f"{second}% in the second year. How many residents does it have after two years?"
    )
    return text, f"{population} * (100 + {first}) / 100 * (100 + {second}) / 100"


TEMPLATES = [shopping, travel, wages, recipe, fuel, savings, stock, bill, grades, building, factory, growth]


def problem(rng: random.Random) -> tuple[str, str, Fraction]:
    """A problem whose answer is an exact decimal of at most 4 places, 2 for an amount of money (whole
    cents, so an answer rounded to cents is right): (text, expression, answer)."""
    while True:
        template = rng.choice(TEMPLATES)
        text, expression = template(rng)
        value = compute(expression)
        if not isinstance(value, Fraction):
            continue
        places = decimal_places(value)
        if places is not None and places <= (2 if "dollars" in text else 4):
            return text, expression, value


@functools.cache
def make_tasks(split: Split) -> tuple[Task, ...]:
    """The tasks of a split, the same on every call and machine (see the module docstring)."""

    def draw(rng: random.Random) -> tuple[str, dict[str, Any]]:
        text, expression, value = problem(rng)
        return text, {"answer": render(value), "expression": expression}

    return generated_split("calc", split, SIZES, draw, lambda prompt, data: prompt)


class CalcEnvironment(ToolEnvironment):
    """Arithmetic word problems with a calculator (see the module docstring)."""

    name = "calc"

    def tools(self) -> list[Callable[..., Any]]:
        return [calculator]

    def tasks(self, split: Split) -> list[Task]:
        return list(make_tasks(split))

    def instructions(self, task: Task) -> str:
        return (
            "You solve arithmetic word problems. Use the calculator tool for every computation instead of "
            "working it out yourself. When you know the result, reply without a tool call and end your reply "
            "with the final number."
        )

    def check(self, task: Task, answer: str) -> float:
        return float(numbers_match(last_number(answer), float(Fraction(task.data["answer"]))))
