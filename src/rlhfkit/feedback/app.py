"""The labelling web app: FastAPI, server-rendered HTML, one SQLite file (``store`` has the storage rules).

Security model:

* Authentication. Every route but ``/login`` needs a session cookie (``rlhfkit_session``: random, HttpOnly,
  SameSite=Strict; the database keeps only its hash). Without one a page request is redirected to the
  login page and anything else gets 401; nothing else is revealed. Annotators see and submit only the
  items assigned to them; ``/admin`` pages need the admin role (403 otherwise).
* Login throttling. After 10 failed logins within 60 s (``create_app`` arguments) for one user name, existing
  or not, or from one client address, further attempts get 429 with ``Retry-After`` and their password is
  not checked. A login clears its name's failures, not its address's. Failed and refused logins are logged
  (logger ``rlhfkit.feedback``) with name and address. The counts live in memory and are per process:
  several workers each count their own, and a restart forgets them.
* Behind a reverse proxy. ``X-Forwarded-For`` (the client's address) and ``X-Forwarded-Proto`` (http or
  https) are read only from the addresses in ``forwarded_allow_ips`` (default: the local host), by uvicorn's
  ``ProxyHeadersMiddleware`` inside the app, so the rule is the same under any server and in tests; from
  anyone else they are ignored, or a client could pick its own address or claim TLS.
* Cookies are ``Secure`` (sent by browsers only over HTTPS) with ``secure_cookies``, and on every request
  that arrived over HTTPS: TLS served by uvicorn itself, or ``X-Forwarded-Proto: https`` from a trusted
  proxy. Without the flag a plain-HTTP request (a development server) still gets a cookie that works.
* CSRF. Every POST carries the session's CSRF token in a form field, compared in constant time; a POST
  whose ``Origin`` header names another host is refused too. SameSite=Strict already keeps the cookie off
  cross-site requests; the token also covers browsers and proxies that do not honour it. The login form,
  which has no session yet, uses a double-submit cookie.
* Output. Jinja2 autoescaping for every value; a Content-Security-Policy that allows only the page's own
  inline script (by nonce), no framing, no third-party anything.

Answers are shown in a random order that is stable per (annotator, item), seeded with a per-project
secret, and the model that wrote each one is never sent to the browser. The form names answers by their
display slot; the server maps slots back to stored positions. An episode item (`feedback.episodes`) is
ranked the same way, its K episodes shown turn by turn, and its form also flags assistant turns.
"""

from __future__ import annotations

import logging
import random
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from rlhfkit.errors import RlhfkitError
from rlhfkit.feedback import episodes, store
from rlhfkit.feedback.agreement import agreement_report, dense_levels
from rlhfkit.feedback.export import FORMATS, export_rows, to_jsonl
from rlhfkit.feedback.security import LoginThrottle, new_token, same_secret
from rlhfkit.feedback.templates import environment

SESSION_COOKIE = "rlhfkit_session"
LOGIN_COOKIE = "rlhfkit_login_csrf"
LETTERS = "abcdefghij"
log = logging.getLogger("rlhfkit.feedback")
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_STATIC_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make browsers send Origin: null
    "Cache-Control": "no-store",
}
_CSP = "; ".join(
    [
        "default-src 'none'",
        "style-src 'unsafe-inline'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)


class NotAuthenticated(Exception):
    """No live session: pages redirect to the login form, everything else gets 401."""


class Forbidden(Exception):
    """Logged in, but not allowed: another annotator's item, an admin page, a bad CSRF token."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Auth:
    """The request's user and their session's CSRF token."""

    user: store.User
    csrf: str


def display_order(secret: str, user_id: int, item_id: int, k: int) -> list[int]:
    """Stored answer positions in the order this annotator sees them: random, but the same on every visit."""
    order = list(range(k))
    random.Random(f"{secret}:{user_id}:{item_id}").shuffle(order)
    return order


def parse_label(form: FormData, order: list[int], noun: str = "answer") -> tuple[str, list[int] | None]:
    """(kind, levels per stored position) of a submitted form; ValueError with a message for the labeller.
    ``noun`` is what is ranked ("answer", "episode")."""
    action = form.get("action", "rank")
    if action in ("all_bad", "skip"):
        return str(action), None
    if action != "rank":
        raise ValueError(f"unknown action {action!r}")
    k = len(order)
    given = []
    for slot in range(k):
        value = str(form.get(f"rank_{slot}", ""))
        if not value.isdigit() or not 1 <= int(value) <= k:
            raise ValueError(
                f"give every {noun} a rank from 1 (best) to {k}; {noun} {LETTERS[slot].upper()} has none"
            )
        given.append(int(value))
    levels = dense_levels(given)  # by display slot
    if len(set(levels)) < 2:
        raise ValueError(f'you tied every {noun}; rank them, or choose "All bad" or "Skip"')
    by_position = [0] * k
    for slot, position in enumerate(order):
        by_position[position] = levels[slot]
    return "rank", by_position


def create_app(  # noqa: C901, PLR0915 - the routes are closures over the app's state
    db: str | Path,
    lease: float = store.DEFAULT_LEASE_SECONDS,
    secure_cookies: bool = False,
    login_failures: int = 10,
    login_window: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    forwarded_allow_ips: str | list[str] = "127.0.0.1",
) -> FastAPI:
    """The app over an existing project database. ``secure_cookies`` marks every cookie HTTPS-only (it is
    already on a request that came over HTTPS); ``forwarded_allow_ips`` are the proxies whose
    ``X-Forwarded-*`` headers count (comma-separated or a list, "*" for any; see the module docstring);
    ``login_failures`` failed logins within ``login_window`` seconds lock a name or address; ``clock`` is for
    tests."""
    if login_failures < 1 or login_window <= 0:
        raise RlhfkitError(
            f"login failures must be at least 1 and the window over 0 s, got {login_failures} "
            f"in {login_window} s"
        )
    store.open_db(db).close()  # fail now, with a clear message, if the file is not a project
    throttle = LoginThrottle(login_failures, login_window, clock=clock)
    env = environment()
    app = FastAPI(title="rlhfkit feedback", docs_url=None, redoc_url=None, openapi_url=None)

    @contextmanager
    def db_conn() -> Iterator[sqlite3.Connection]:
        conn = store.connect(db)
        try:
            yield conn
        finally:
            conn.close()

    with db_conn() as conn:
        secret = store.get_meta(conn, "secret") or ""

    def render(name: str, request: Request, status: int = 200, **context: Any) -> HTMLResponse:
        nonce = new_token()
        defaults = {"user": None, "csrf": "", "error": None, "message": None, "title": name.split(".")[0]}
        auth = getattr(request.state, "auth", None)
        if auth is not None:
            defaults |= {"user": auth.user, "csrf": auth.csrf}
        html = env.get_template(name).render(**(defaults | context), nonce=nonce)
        response = HTMLResponse(html, status_code=status)
        response.headers["Content-Security-Policy"] = _CSP + f"; script-src 'nonce-{nonce}'"
        return response

    def secure(request: Request) -> bool:
        """Whether this request's cookies get the Secure flag: always with the flag, else over HTTPS."""
        return secure_cookies or request.url.scheme == "https"

    def set_cookie(
        response: Response,
        request: Request,
        key: str,
        value: str,
        path: str = "/",
        max_age: int | None = None,
    ) -> None:
        response.set_cookie(
            key, value, path=path, max_age=max_age, httponly=True, samesite="strict", secure=secure(request)
        )

    # ------------------------------------------------------------------------------ middleware
    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for key, value in _STATIC_HEADERS.items():
            response.headers.setdefault(key, value)
        response.headers.setdefault("Content-Security-Policy", _CSP)
        return response

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
        if request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse("login required", status_code=401)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        return render("message.html", request, 403, title="Not allowed", message=exc.message, error=True)

    # ------------------------------------------------------------------------------ auth
    def authenticated(request: Request) -> Auth:
        with db_conn() as conn:
            found = store.session_user(conn, request.cookies.get(SESSION_COOKIE))
        if found is None:
            raise NotAuthenticated()
        request.state.auth = Auth(*found)
        return request.state.auth

    def admin(auth: Auth = Depends(authenticated)) -> Auth:
        if auth.user.role != "admin":
            raise Forbidden("this page is for admins")
        return auth

    def check_origin(request: Request) -> None:
        """Refuse a POST whose Origin names another site (or is opaque); absent Origin passes to the token."""
        origin = request.headers.get("origin")
        if origin is not None and (
            origin == "null" or urlsplit(origin).netloc != request.headers.get("host")
        ):
            raise Forbidden("cross-site request refused")

    async def csrf_form(request: Request, auth: Auth = Depends(authenticated)) -> FormData:
        """The POSTed form, after the origin and CSRF checks."""
        check_origin(request)
        form = await request.form()
        if not same_secret(str(form.get("csrf", "")), auth.csrf):
            raise Forbidden("the form's security token is missing or stale; reload the page and try again")
        return form

    # ------------------------------------------------------------------------------ login
    @app.get("/login")
    def login_page(request: Request) -> Response:
        token = new_token()
        response = render("login.html", request, login_csrf=token, title="Log in")
        set_cookie(response, request, LOGIN_COOKIE, token, path="/login")
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        check_origin(request)
        form = await request.form()
        if not same_secret(str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE)):
            raise Forbidden("the login form expired; reload the page and try again")
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        key = name[:64]  # no account name is longer; keeps an attacker's names from filling memory
        address = request.client.host if request.client else "unknown"
        wait = throttle.retry_after(key, address)
        if wait:
            # refused before the password is checked: a right one must not get through, nor cost scrypt time
            log.warning("login refused (throttled) for user %r from %s", key, address)
            message = f"Too many failed logins; try again in {wait} s."
            return PlainTextResponse(message, status_code=429, headers={"Retry-After": str(wait)})

        def check() -> tuple[str, str] | None:
            with db_conn() as conn:
                user = store.authenticate(conn, name, password)
                return store.create_session(conn, user) if user else None

        session = await run_in_threadpool(check)
        if session is None:
            throttle.failed(key, address)
            log.warning("failed login for user %r from %s", key, address)  # %r: a name cannot forge log lines
            token = new_token()
            response: Response = render(
                "login.html", request, 401, login_csrf=token, error="Wrong name or password."
            )
            set_cookie(response, request, LOGIN_COOKIE, token, path="/login")
            return response
        throttle.succeeded(key)
        response = RedirectResponse("/", status_code=303)
        set_cookie(response, request, SESSION_COOKIE, session[0], max_age=store.SESSION_SECONDS)
        response.delete_cookie(LOGIN_COOKIE, path="/login", secure=secure(request))
        return response

    @app.post("/logout")
    def logout(request: Request, form: FormData = Depends(csrf_form)) -> Response:
        with db_conn() as conn:
            store.end_session(conn, request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=secure(request))
        return response

    @app.get("/")
    def home(auth: Auth = Depends(authenticated)) -> Response:
        return RedirectResponse("/admin" if auth.user.role == "admin" else "/label", status_code=303)

    # ------------------------------------------------------------------------------ labelling
    @app.get("/label")
    def next_page(request: Request, auth: Auth = Depends(authenticated)) -> Response:
        with db_conn() as conn:
            item_id = store.next_item(conn, auth.user.id, lease)
            if item_id is not None:
                return RedirectResponse(f"/label/{item_id}", status_code=303)
            done, remaining = store.progress(conn, auth.user.id, lease)
        return render("done.html", request, title="Done", done=done, remaining=remaining)

    def item_page(
        request: Request, auth: Auth, item_id: int, status: int = 200, error: str | None = None
    ) -> Response:
        with db_conn() as conn:
            item = store.load_item(conn, item_id) if store.is_assigned(conn, auth.user.id, item_id) else None
            if item is None:
                raise Forbidden("this item is not assigned to you")
            done, remaining = store.progress(conn, auth.user.id, lease)
            guidelines = store.get_meta(conn, "guidelines", "")
            episode_item = episodes.load_episode_item(conn, item_id)
        common = {"title": f"Item {item_id}", "item_id": item_id, "submission_id": new_token(), "done": done,
                  "remaining": remaining, "guidelines": guidelines, "error": error}  # fmt: skip
        if episode_item is not None:
            order = display_order(secret, auth.user.id, item_id, len(episode_item.episodes))
            return render(
                "episodes.html", request, status, prompt=episode_item.prompt,
                tools=episodes.tool_names(episode_item), episodes=episodes.page_episodes(episode_item, order),
                **common,
            )  # fmt: skip
        order = display_order(secret, auth.user.id, item_id, len(item.answers))
        answers = [
            {"slot": slot, "letter": LETTERS[slot].upper(), "text": item.answers[pos].text}
            for slot, pos in enumerate(order)
        ]
        messages = item.prompt if isinstance(item.prompt, list) else None
        return render(
            "item.html", request, status, prompt=item.prompt, messages=messages, answers=answers, **common
        )

    @app.get("/label/{item_id}")
    def show_item(request: Request, item_id: int, auth: Auth = Depends(authenticated)) -> Response:
        return item_page(request, auth, item_id)

    @app.post("/label/{item_id}")
    def submit(
        request: Request,
        item_id: int,
        auth: Auth = Depends(authenticated),
        form: FormData = Depends(csrf_form),
    ) -> Response:
        submission_id = str(form.get("submission_id", ""))
        if not _SUBMISSION_ID.match(submission_id):
            return PlainTextResponse("bad submission id", status_code=400)
        with db_conn() as conn:
            item = store.load_item(conn, item_id) if store.is_assigned(conn, auth.user.id, item_id) else None
            if item is None:
                raise Forbidden("this item is not assigned to you")
            episode_item = episodes.load_episode_item(conn, item_id)
            k = len(episode_item.episodes) if episode_item is not None else len(item.answers)
            order = display_order(secret, auth.user.id, item_id, k)
            flags = None
            try:
                kind, ranks = parse_label(form, order, "answer" if episode_item is None else "episode")
                if episode_item is not None and kind != "skip":
                    flags = episodes.parse_flags(form, order, episode_item)
            except ValueError as exc:
                return item_page(request, auth, item_id, 400, str(exc))
            outcome = store.submit(conn, auth.user.id, item_id, submission_id, kind, ranks, flags)
        if outcome in (store.Outcome.STORED, store.Outcome.REPLAYED):
            return RedirectResponse("/label", status_code=303)  # sent only after the COMMIT returned
        message = "You already labelled this item; your first answer is kept."
        return render("message.html", request, 409, title="Already labelled", message=message, error=True)

    # ------------------------------------------------------------------------------ admin
    def admin_page(
        request: Request, status: int = 200, message: str | None = None, error: bool = False
    ) -> Response:
        with db_conn() as conn:
            rankings: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
            for label in store.labels(conn, kinds=("rank",)):
                assert label.ranks is not None
                rankings.setdefault(label.item_id, []).append((label.user, label.ranks))
            report = agreement_report(rankings)
            context = {
                "counts": store.counts(conn), "overlap": store.overlap(conn), "users": store.users(conn),
                "per_user": store.per_user_counts(conn),
            }  # fmt: skip
        items = sorted(
            ((i, n, pw, loo) for i, (n, pw, loo) in report.per_item.items()),
            key=lambda row: (row[3].value if row[3].value is not None else 2.0, row[0]),
        )[:200]
        return render(
            "admin.html", request, status, title="Admin", report=report, items=items, message=message,
            error=error, **context,
        )  # fmt: skip

    @app.get("/admin")
    def admin_home(request: Request, auth: Auth = Depends(admin)) -> Response:
        return admin_page(request)

    @app.post("/admin/users")
    def add_user(
        request: Request, auth: Auth = Depends(admin), form: FormData = Depends(csrf_form)
    ) -> Response:
        name, role = str(form.get("name", "")), str(form.get("role", "annotator"))
        try:
            with db_conn() as conn:
                created = store.add_user(conn, name, role, str(form.get("password", "")))
        except RlhfkitError as exc:
            return admin_page(request, 400, str(exc), error=True)
        verb = "Added" if created else "Updated the password and role of"
        return admin_page(request, message=f"{verb} {role} '{name.strip()}'.")

    @app.get("/admin/export")
    def download(fmt: str = Query("rankings", alias="format"), auth: Auth = Depends(admin)) -> Response:
        if fmt not in FORMATS:
            return PlainTextResponse(f"format must be one of {', '.join(FORMATS)}", status_code=400)
        with db_conn() as conn:
            body = to_jsonl(export_rows(conn, fmt))
        disposition = f'attachment; filename="feedback-{fmt}.jsonl"'
        return Response(body, media_type="application/x-ndjson", headers={"Content-Disposition": disposition})

    # outermost: the routes, the throttle and the cookies see the client and scheme a trusted proxy names
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=forwarded_allow_ips)
    return app
