"""Human feedback in a browser: sample answers or agent episodes, let people rank them, export preferences.

    rlhfkit feedback prepare  --model DIR --prompts FILE --k 3 --overlap 2 --db fb.sqlite
    rlhfkit feedback prepare  --env support --policy DIR --k 4 --set limit=50 --db fb.sqlite  # episodes
    rlhfkit feedback add-user --db fb.sqlite --name alice --role admin        # asks for a password
    rlhfkit feedback serve    --db fb.sqlite --port 8000                       # the admin adds annotators
    rlhfkit feedback export   --db fb.sqlite --out pairs.jsonl --format pairs  # -> rlhfkit rm --data ...

Modules: ``store`` (SQLite schema, durability, assignment, idempotent submissions), ``security``
(password and token hashing), ``app`` + ``templates`` (the web app), ``agreement`` (the math),
``export`` (formats, ties and "all bad"), ``prepare`` (sampling answers), ``episodes``, ``episode_templates``
and ``episode_prepare`` (agent episodes: storage and flags, their page, sampling), ``cli``.
"""
