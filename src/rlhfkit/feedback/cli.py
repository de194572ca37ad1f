"""`rlhfkit feedback ...`: prepare a labelling project, add accounts, serve the web app, export labels.

`prepare` makes a project of answers (``--model --prompts``: `feedback.prepare`) or of agent episodes
(``--env`` with ``--policy`` or ``--endpoint``, other settings by ``--set``: `feedback.episode_prepare`).

Accounts are plain name + password pairs (no invite tokens): the first admin is made with ``add-user`` on
the command line, then admins add annotators on the admin page or with ``add-user``. Running ``add-user``
for an existing name sets a new password and role and ends that user's sessions.

Heavy modules (torch, fastapi, uvicorn) are imported inside the commands, so ``rlhfkit --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

feedback_app = typer.Typer(
    name="feedback",
    help="People rank model answers or agent episodes in a browser; export the rankings as preference data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

DbOpt = Annotated[Path, typer.Option("--db", help="SQLite file of the labelling project.")]
PASSWORD_ENV = "RLHFKIT_FEEDBACK_PASSWORD"


@feedback_app.command()
def prepare(  # noqa: PLR0913 - one option per setting, as the other commands
    db: DbOpt,
    model: Annotated[
        str | None, typer.Option(help="Answers: the model that writes them (name, local dir or hub id).")
    ] = None,
    prompts: Annotated[
        str | None, typer.Option(help="Answers: prompts file ({'prompt': ...} rows) or bundled:NAME.")
    ] = None,
    env: Annotated[
        str | None, typer.Option(help="Episodes: the environment (calc, support, ... or module:Class).")
    ] = None,
    policy: Annotated[str | None, typer.Option(help="Episodes: the local model that acts.")] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Episodes: an OpenAI-compatible server (its /v1 URL) that acts.")
    ] = None,
    k: Annotated[
        int | None, typer.Option("--k", help="Answers (default 3) or episodes (default 4) per item, 2 to 10.")
    ] = None,
    overlap: Annotated[int | None, typer.Option(help="Annotators per item (N; default 2).")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Longest answer, or agent turn, in tokens (default 64, 128).")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature (> 0; default 0.8).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default 0).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Sequences (episodes) per sampling batch (default 16).")
    ] = None,
    guidelines: Annotated[str | None, typer.Option(help="Text file with labelling guidelines.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Episodes: override a setting, e.g. --set limit=50 (repeatable)."),
    ] = None,
) -> None:
    """Sample K answers per prompt (--model, --prompts), or K episodes per task of an environment (--env
    with --policy or --endpoint), and store them as a labelling project."""
    from rlhfkit.console import console as err
    from rlhfkit.console import run_command
    from rlhfkit.errors import RlhfkitError

    def answers() -> None:
        from rlhfkit.feedback.prepare import PrepareConfig, run_prepare
        from rlhfkit.rollout import SamplingConfig

        if model is None or prompts is None or policy or endpoint or set_:
            raise RlhfkitError(
                "feedback prepare takes --model and --prompts (answers), or --env with --policy or "
                "--endpoint and any --set (episodes)"
            )
        cfg = PrepareConfig(
            model=model, prompts=prompts, db=str(db), k=3 if k is None else k,
            overlap=2 if overlap is None else overlap, seed=seed or 0,
            batch_size=16 if batch_size is None else batch_size,
            sampling=SamplingConfig(
                max_new_tokens=64 if max_new_tokens is None else max_new_tokens,
                temperature=0.8 if temperature is None else temperature,
            ),
            guidelines=guidelines,
        )  # fmt: skip
        n = run_prepare(cfg)
        dropped = f" ({n['dropped']} prompts dropped: fewer than 2 distinct answers)" if n["dropped"] else ""
        err.print(f"[bold]feedback[/]: {n['items']} items, {n['answers']} answers stored in {db}{dropped}")

    def episodes() -> None:
        from rlhfkit.config import load_config
        from rlhfkit.feedback.episode_prepare import EpisodePrepareConfig, run_episode_prepare

        if model is not None or prompts is not None:
            raise RlhfkitError(
                "--env samples episodes of the environment's tasks: drop --model and --prompts"
            )
        given = {"policy": policy, "endpoint": endpoint, "k": k, "overlap": overlap, "seed": seed,
                 "batch_size": batch_size, "guidelines": guidelines}  # fmt: skip
        base: dict = {"env": env, "db": str(db), **{key: v for key, v in given.items() if v is not None}}
        if temperature is not None:
            base["sampling"] = {"temperature": temperature}
        if max_new_tokens is not None:
            base["agent"] = {"max_new_tokens": max_new_tokens}
        n = run_episode_prepare(load_config(EpisodePrepareConfig, None, set_, base=base))
        dropped = f" ({n['dropped']} tasks dropped: fewer than 2 distinct episodes)" if n["dropped"] else ""
        err.print(f"[bold]feedback[/]: {n['items']} items, {n['episodes']} episodes stored in {db}{dropped}")

    run_command(episodes if env is not None else answers)


@feedback_app.command("add-user")
def add_user(
    db: DbOpt,
    name: Annotated[str, typer.Option(help="Login name.")],
    role: Annotated[str, typer.Option(help="admin or annotator.")] = "annotator",
    password: Annotated[
        str,
        typer.Option(
            envvar=PASSWORD_ENV,
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            help=f"Password (8+ characters); default: ${PASSWORD_ENV}, else asked for.",
        ),
    ] = "",
) -> None:
    """Create an account (or set a new password and role for an existing one)."""
    from rlhfkit.console import console as err
    from rlhfkit.console import run_command
    from rlhfkit.feedback.store import add_user as store_add_user
    from rlhfkit.feedback.store import open_db

    def go() -> None:
        conn = open_db(db)
        try:
            created = store_add_user(conn, name, role, password)
        finally:
            conn.close()
        err.print(f"[bold]feedback[/]: {'added' if created else 'updated'} {role} '{name.strip()}'")

    run_command(go)


@feedback_app.command()
def serve(
    db: DbOpt,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every one).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    overlap: Annotated[int | None, typer.Option(help="Change the annotators per item (N).")] = None,
    lease_minutes: Annotated[
        float, typer.Option(help="Give an unanswered item to others after this.")
    ] = 30.0,
    secure_cookies: Annotated[
        bool,
        typer.Option(
            help="Mark every cookie Secure (sent over HTTPS only). Without it, a request that came over "
            "HTTPS (X-Forwarded-Proto: https from a --forwarded-allow-ips proxy) still gets Secure cookies."
        ),
    ] = False,
    forwarded_allow_ips: Annotated[
        str,
        typer.Option(
            envvar="FORWARDED_ALLOW_IPS",
            help="Comma-separated addresses of the reverse proxies whose X-Forwarded-For and "
            "X-Forwarded-Proto headers are trusted ('*' for any); from others they are ignored.",
        ),
    ] = "127.0.0.1",
    login_failures: Annotated[
        int, typer.Option(help="Failed logins per user name or address that lock it (429) for a while.")
    ] = 10,
    login_window: Annotated[float, typer.Option(help="Seconds over which failed logins count.")] = 60.0,
) -> None:
    """Serve the labelling app (log in with an account made by add-user)."""
    from rlhfkit.console import console as err
    from rlhfkit.console import run_command

    def go() -> None:
        import uvicorn

        from rlhfkit.errors import RlhfkitError
        from rlhfkit.feedback.app import create_app
        from rlhfkit.feedback.store import open_db, set_meta

        if overlap is not None:
            if overlap < 1:
                raise RlhfkitError(f"--overlap must be at least 1, got {overlap}")
            conn = open_db(db)
            set_meta(conn, "overlap", str(overlap))
            conn.close()
        app = create_app(
            db, lease=lease_minutes * 60, secure_cookies=secure_cookies, login_failures=login_failures,
            login_window=login_window, forwarded_allow_ips=forwarded_allow_ips,
        )  # fmt: skip
        err.print(f"[bold]feedback[/]: serving {db} on http://{host}:{port}/ (Ctrl-C stops)")
        # the app reads proxy headers itself (forwarded_allow_ips); uvicorn must not apply its own rule too
        uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False)

    run_command(go)


@feedback_app.command()
def export(
    db: DbOpt,
    out: Annotated[Path, typer.Option(help="JSONL file to write (atomically).")],
    fmt: Annotated[str, typer.Option("--format", help="pairs (prompt/chosen/rejected), rankings")] = "pairs",
) -> None:
    """Write the rankings, or the preference pairs they imply, for `rlhfkit rm` / `rlhfkit dpo`."""
    from rlhfkit.console import console as err
    from rlhfkit.console import run_command
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.feedback.export import FORMATS
    from rlhfkit.feedback.export import export as run_export
    from rlhfkit.feedback.store import open_db

    def go() -> None:
        if fmt not in FORMATS:
            raise RlhfkitError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
        conn = open_db(db)
        try:
            n = run_export(conn, out, fmt)
        finally:
            conn.close()
        err.print(
            f"[bold]feedback[/]: {n['rows']} {fmt} rows written to {out} "
            f"(left out: {n['all_bad']} all-bad, {n['skip']} skipped labels)"
        )

    run_command(go)


@feedback_app.command()
def agreement(
    db: DbOpt,
    judge: Annotated[
        str | None,
        typer.Option(
            help="An LLM judge to measure against the people: a model directory or an endpoint URL."
        ),
    ] = None,
    mode: Annotated[str, typer.Option(help="pairwise (both orders) or group (over rotations).")] = "pairwise",
    rubric: Annotated[Path | None, typer.Option(help="Text file with the judge's rubric.")] = None,
    limit: Annotated[int | None, typer.Option(help="Judge at most this many labelled items.", min=1)] = None,
) -> None:
    """How much the annotators agree, and with --judge how much an LLM judge agrees with them."""
    import json

    from rlhfkit.console import run_command
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.feedback.agreement import agreement_report
    from rlhfkit.feedback.store import labels, open_db

    def go() -> None:
        if mode not in ("pairwise", "group"):
            raise RlhfkitError(f"--mode must be pairwise or group, got '{mode}'")
        if rubric is not None and not rubric.is_file():
            raise RlhfkitError(f"--rubric {rubric}: no such file")
        conn = open_db(db)
        try:
            rankings: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
            for label in labels(conn, kinds=("rank",)):
                assert label.ranks is not None
                rankings.setdefault(label.item_id, []).append((label.user, label.ranks))
            people = agreement_report(rankings)
            out: dict[str, object] = {
                "items": people.items, "pairwise": people.pairwise.value,
                "leave_one_out": people.leave_one_out.value, "alpha_ordinal": people.alpha_ordinal,
            }  # fmt: skip
            if judge is not None:
                from rlhfkit.chat.llm import load_llm
                from rlhfkit.feedback.judges import DEFAULT_RUBRIC, EpisodeJudge, judge_database

                text = rubric.read_text(encoding="utf-8") if rubric is not None else DEFAULT_RUBRIC
                llm_judge = EpisodeJudge(load_llm(judge), text, mode)  # type: ignore[arg-type]
                out["judge"] = judge_database(conn, llm_judge, limit)
        finally:
            conn.close()
        typer.echo(json.dumps(out, indent=1))

    run_command(go)
