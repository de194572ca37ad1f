"""The `db` environment's tasks: small tables drawn from a seed and questions with gold SQL.

A task's data holds its tables ({"name", "columns": [[name, type], ...], "rows"}), the question's gold
`sql`, the gold `answer` (the SQL's result: a number, a name, or a list of names), its `kind` ("number",
"text", "list") and the `choices` a text or list answer is read against (the values of the answer's column).
Questions with a tie for the answer are drawn again. Train (1,000) and test (150) use different seeds, and a
train task identical to a test task (same question over the same rows) is dropped.
"""

from __future__ import annotations

import functools
import json
import random
import sqlite3
from pathlib import Path
from typing import Any

from rlhfkit.agents.env import Split, Task, generated_split

SIZES = {"train": 1000, "test": 150}
PEOPLE = [
    "Alice",
    "Bruno",
    "Chen",
    "Dana",
    "Emeka",
    "Fatima",
    "Goran",
    "Hana",
    "Igor",
    "Julia",
    "Kofi",
    "Lea",
    "Mateo",
    "Nadia",
    "Oscar",
    "Paula",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wen",
    "Yusuf",
    "Zoe",
    "Arjun",
    "Beatriz",
    "Carlos",
    "Dmitri",
    "Elif",
]
CITIES = ["Lyon", "Porto", "Denver", "Osaka", "Krakow", "Austin", "Bergen", "Seville"]
PRODUCTS = [
    "Desk Lamp",
    "Office Chair",
    "Notebook",
    "Water Bottle",
    "Backpack",
    "Headphones",
    "Keyboard",
    "Mouse Pad",
    "Coffee Mug",
    "Phone Case",
    "Umbrella",
    "Sunglasses",
    "Yoga Mat",
    "Tea Kettle",
    "Monitor",
    "Webcam",
    "Stapler",
    "Plant Pot",
    "Blender",
    "Toaster",
]
PLACES = [
    ("Tokyo", "Japan"),
    ("Osaka", "Japan"),
    ("Kyoto", "Japan"),
    ("Lyon", "France"),
    ("Paris", "France"),
    ("Nice", "France"),
    ("Porto", "Portugal"),
    ("Lisbon", "Portugal"),
    ("Braga", "Portugal"),
    ("Denver", "USA"),
    ("Austin", "USA"),
    ("Boston", "USA"),
    ("Seattle", "USA"),
    ("Krakow", "Poland"),
    ("Warsaw", "Poland"),
    ("Gdansk", "Poland"),
    ("Bergen", "Norway"),
    ("Oslo", "Norway"),
]


def employees(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    names, departments, cities = (
        rng.sample(PEOPLE, rng.randint(8, 15)),
        rng.sample(["Sales", "Engineering", "Marketing", "Finance", "Support"], 3),
        rng.sample(CITIES, 3),
    )
    rows = [
        [
            i + 1,
            n,
            rng.choice(departments),
            rng.randint(30, 150) * 1000 + rng.choice([0, 250, 500, 750]),
            rng.randint(22, 64),
            rng.choice(cities),
        ]
        for i, n in enumerate(names)
    ]
    table = {
        "name": "employees",
        "columns": [
            ["id", "INTEGER"],
            ["name", "TEXT"],
            ["department", "TEXT"],
            ["salary", "INTEGER"],
            ["age", "INTEGER"],
            ["city", "TEXT"],
        ],
        "rows": rows,
    }
    spec = {
        "table": "employees",
        "noun": "employees",
        "one": "employee",
        "key": "name",
        "cats": {"department": "in the {} department", "city": "based in {}"},
        "nums": ["salary", "age"],
    }
    return table, spec


def products(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    names, categories = (
        rng.sample(PRODUCTS, rng.randint(8, 15)),
        rng.sample(["Office", "Kitchen", "Electronics", "Outdoor", "Home"], 3),
    )
    rows = [
        [
            i + 1,
            n,
            rng.choice(categories),
            rng.randint(3, 240) + rng.choice([0.99, 0.49, 0.25, 0.0]),
            rng.randint(0, 400),
        ]
        for i, n in enumerate(names)
    ]
    table = {
        "name": "products",
        "columns": [
            ["id", "INTEGER"],
            ["name", "TEXT"],
            ["category", "TEXT"],
            ["price", "REAL"],
            ["stock", "INTEGER"],
        ],
        "rows": rows,
    }
    spec = {
        "table": "products",
        "noun": "products",
        "one": "product",
        "key": "name",
        "cats": {"category": "in the {} category"},
        "nums": ["price", "stock"],
    }
    return table, spec


def cities(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    places = rng.sample(PLACES, rng.randint(8, 15))
    rows = [
        [name, country, rng.randint(40, 9000) * 1000 + rng.randint(0, 999), round(rng.uniform(40, 2200), 1)]
        for name, country in places
    ]
    table = {
        "name": "cities",
        "columns": [["name", "TEXT"], ["country", "TEXT"], ["population", "INTEGER"], ["area", "REAL"]],
        "rows": rows,
    }
    spec = {
        "table": "cities",
        "noun": "cities",
        "one": "city",
        "key": "name",
        "cats": {"country": "in {}"},
        "nums": ["population", "area"],
    }
    return table, spec


def students(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    names, clubs = (
        rng.sample(PEOPLE, rng.randint(8, 15)),
        rng.sample(["chess", "drama", "robotics", "football", "choir"], 3),
    )
    rows = [
        [i + 1, n, rng.choice(["7A", "7B", "8A"]), rng.randint(35, 100), rng.choice(clubs)]
        for i, n in enumerate(names)
    ]
    table = {
        "name": "students",
        "columns": [
            ["id", "INTEGER"],
            ["name", "TEXT"],
            ["class", "TEXT"],
            ["score", "INTEGER"],
            ["club", "TEXT"],
        ],
        "rows": rows,
    }
    spec = {
        "table": "students",
        "noun": "students",
        "one": "student",
        "key": "name",
        "cats": {"class": "in class {}", "club": "in the {} club"},
        "nums": ["score"],
    }
    return table, spec


def orders(rng: random.Random, products_table: dict[str, Any]) -> dict[str, Any]:
    customers = rng.sample(PEOPLE, rng.randint(4, 7))
    ids = [r[0] for r in products_table["rows"]]
    rows = [
        [i + 1, rng.choice(customers), rng.choice(ids), rng.randint(1, 12)] for i in range(rng.randint(8, 15))
    ]
    return {
        "name": "orders",
        "columns": [
            ["id", "INTEGER"],
            ["customer", "TEXT"],
            ["product_id", "INTEGER"],
            ["quantity", "INTEGER"],
        ],
        "rows": rows,
    }


def write_database(path: str | Path | None, tables: list[dict[str, Any]]) -> sqlite3.Connection:
    """Create the tables in a new database (`path` None: in memory); returns the open connection."""
    conn = sqlite3.connect(":memory:" if path is None else str(path))
    conn.execute("PRAGMA synchronous = OFF")  # a throw-away copy: no fsync
    conn.execute("PRAGMA journal_mode = OFF")
    for t in tables:
        columns = ", ".join(f'"{name}" {kind}' for name, kind in t["columns"])
        conn.execute(f'CREATE TABLE "{t["name"]}" ({columns})')
        marks = ", ".join("?" for _ in t["columns"])
        conn.executemany(f'INSERT INTO "{t["name"]}" VALUES ({marks})', t["rows"])
    conn.commit()
    if path is not None:
        conn.close()
    return conn


def single_table_question(
    rng: random.Random, spec: dict[str, Any], rows: list[dict[str, Any]]
) -> tuple[str, str, str, str, str | None]:
    """(question, gold sql, kind, choices sql, tie sql); the tie sql gives a text answer's top two scores."""
    t, noun, one, key = spec["table"], spec["noun"], spec["one"], spec["key"]
    cat = rng.choice(list(spec["cats"]))
    value = rng.choice(rows)[cat]
    where = spec["cats"][cat].format(value)
    num = rng.choice(spec["nums"])
    cut = sorted(r[num] for r in rows)[len(rows) // 2]
    keys = f"SELECT {key} FROM {t}"
    a_num = f"{'an' if num[0] in 'aeiou' else 'a'} {num}"
    kind = rng.randrange(8)
    if kind == 0:
        return (
            f"How many {noun} are {where}?",
            f"SELECT COUNT(*) FROM {t} WHERE {cat} = '{value}'",
            "number",
            "",
            None,
        )
    if kind == 1:
        word, fn = rng.choice([("average", "AVG"), ("total", "SUM"), ("highest", "MAX"), ("lowest", "MIN")])
        sql = f"SELECT {fn}({num}) FROM {t} WHERE {cat} = '{value}'"
        return f"What is the {word} {num} of the {noun} {where}?", sql, "number", "", None
    if kind == 2:
        word, order = rng.choice([("highest", "DESC"), ("lowest", "ASC")])
        sql = f"SELECT {key} FROM {t} ORDER BY {num} {order} LIMIT 1"
        return (
            f"Which {one} has the {word} {num}?",
            sql,
            "text",
            keys,
            f"SELECT {num} FROM {t} ORDER BY {num} {order} LIMIT 2",
        )
    if kind == 3:
        sql = f"SELECT {key} FROM {t} WHERE {cat} = '{value}' AND {num} > {cut}"
        return f"Which {noun} {where} have {a_num} above {cut}? List them all.", sql, "list", keys, None
    if kind == 4:
        sql = f"SELECT {cat} FROM {t} GROUP BY {cat} ORDER BY COUNT(*) DESC LIMIT 1"
        tie = f"SELECT COUNT(*) FROM {t} GROUP BY {cat} ORDER BY COUNT(*) DESC LIMIT 2"
        return f"Which {cat} has the most {noun}?", sql, "text", f"SELECT DISTINCT {cat} FROM {t}", tie
    if kind == 5:
        sql = f"SELECT {cat} FROM {t} GROUP BY {cat} ORDER BY SUM({num}) DESC LIMIT 1"
        tie = f"SELECT SUM({num}) FROM {t} GROUP BY {cat} ORDER BY SUM({num}) DESC LIMIT 2"
        return (
            f"Which {cat} has the highest total {num} of its {noun}?",
            sql,
            "text",
            f"SELECT DISTINCT {cat} FROM {t}",
            tie,
        )
    if kind == 6:
        return (
            f"How many {noun} have {a_num} above {cut}?",
            f"SELECT COUNT(*) FROM {t} WHERE {num} > {cut}",
            "number",
            "",
            None,
        )
    return (
        f"How many different values of {cat} do the {noun} have?",
        f"SELECT COUNT(DISTINCT {cat}) FROM {t}",
        "number",
        "",
        None,
    )


def order_question(
    rng: random.Random, product_rows: list[dict[str, Any]], order_rows: list[dict[str, Any]]
) -> tuple[str, str, str, str, str | None]:
    ordered = [p for p in product_rows if any(o["product_id"] == p["id"] for o in order_rows)]
    product = rng.choice(ordered)
    customer = rng.choice(order_rows)["customer"]
    category = product["category"]
    join = "FROM orders JOIN products ON orders.product_id = products.id"
    kind = rng.randrange(4)
    if kind == 0:
        sql = f"SELECT SUM(orders.quantity) {join} WHERE products.name = '{product['name']}'"
        return f"How many units of {product['name']} were ordered in total?", sql, "number", "", None
    if kind == 1:
        sql = f"SELECT SUM(orders.quantity * products.price) {join} WHERE orders.customer = '{customer}'"
        return f"How much did {customer} spend on all their orders, in dollars?", sql, "number", "", None
    if kind == 2:
        sql = f"SELECT DISTINCT orders.customer {join} WHERE products.category = '{category}'"
        question = f"Which customers ordered at least one product in the {category} category? List them all."
        return question, sql, "list", "SELECT DISTINCT customer FROM orders", None
    spent = "SUM(orders.quantity * products.price)"
    sql = f"SELECT orders.customer {join} GROUP BY orders.customer ORDER BY {spent} DESC LIMIT 1"
    tie = f"SELECT {spent} {join} GROUP BY orders.customer ORDER BY 1 DESC LIMIT 2"
    return (
        "Which customer spent the most money in total?",
        sql,
        "text",
        "SELECT DISTINCT customer FROM orders",
        tie,
    )


def draw(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """One task's prompt and data, drawn again until the answer is well defined."""
    while True:
        table, spec = rng.choice([employees, products, cities, students])(rng)
        tables = [table]
        dicts = [dict(zip([c for c, _ in table["columns"]], r, strict=True)) for r in table["rows"]]
        if spec["table"] == "products" and rng.random() < 0.5:
            tables.append(orders(rng, table))
            order_dicts = [
                dict(zip(["id", "customer", "product_id", "quantity"], r, strict=True))
                for r in tables[1]["rows"]
            ]
            question, sql, kind, choices_sql, tie_sql = order_question(rng, dicts, order_dicts)
        else:
            question, sql, kind, choices_sql, tie_sql = single_table_question(rng, spec, dicts)
        conn = write_database(None, tables)
        result = [r[0] for r in conn.execute(sql).fetchall()]
        if tie_sql is not None:
            top = [r[0] for r in conn.execute(tie_sql).fetchall()]
            if len(top) < 2 or top[0] == top[1]:
                continue
        choices = [str(r[0]) for r in conn.execute(choices_sql).fetchall()] if choices_sql else []
        conn.close()
        if kind == "number":
            if len(result) != 1 or result[0] is None:
                continue
            answer: Any = result[0]
        elif kind == "text":
            answer = str(result[0])
        else:
            answer = sorted(str(v) for v in set(result))
            if not 1 <= len(answer) <= 6:
                continue
        schema = "\n".join(
            f"Table {t['name']}: " + ", ".join(f"{c} ({k})" for c, k in t["columns"]) for t in tables
        )
        prompt = f"{question}\n\n{schema}"
        return prompt, {"tables": tables, "sql": sql, "answer": answer, "kind": kind, "choices": choices}


@functools.cache
def make_tasks(split: Split) -> tuple[Task, ...]:
    """The tasks of a split, the same on every call and machine (see the module docstring)."""
    return generated_split(
        "db", split, SIZES, draw, lambda prompt, data: json.dumps([prompt, data["tables"]])
    )
