"""Human feedback in a browser: sample answers, let people rank them, export preference data.

    rlhfkit feedback prepare  --model DIR --prompts FILE --k 3 --overlap 2 --db fb.sqlite
    rlhfkit feedback add-user --db fb.sqlite --name alice --role admin        # asks for a password
    rlhfkit feedback serve    --db fb.sqlite --port 8000                       # the admin adds annotators
    rlhfkit feedback export   --db fb.sqlite --out pairs.jsonl --format pairs  # -> rlhfkit rm --data ...

Modules: ``store`` (SQLite schema, durability, assignment, idempotent submissions), ``security``
(password and token hashing), ``app`` + ``templates`` (the web app), ``agreement`` (the math),
``export`` (formats, ties and "all bad"), ``prepare`` (sampling), ``cli``.
"""
