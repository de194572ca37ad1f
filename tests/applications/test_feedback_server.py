"""The labelling app over real HTTP: a uvicorn server on a free loopback port, httpx clients.

Authentication on every route, login throttling, annotators confined to their own items, escaping of model
text, CSRF, the admin page, and many annotators submitting at once (with doubled and retried requests)
without a label lost or doubled. The helpers here are shared with the browser test.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from tests.conftest import free_port, wait_until_up
from tests.helpers import PASSWORD, XSS, live_server, make_project

from rlhfkit.feedback import store
from rlhfkit.feedback.app import create_app, display_order
from rlhfkit.feedback.export import export_rows, to_jsonl
from rlhfkit.feedback.security import LoginThrottle

# ------------------------------------------------------------------------------------------ helpers


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden field {name!r} in the page"
    return match.group(1)


def login(base: str, name: str, password: str = PASSWORD) -> httpx.Client:
    """An httpx client logged in through the login form (double-submit cookie included)."""
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=30)
    page = client.get("/login")
    reply = client.post(
        "/login", data={"csrf": hidden(page.text, "csrf"), "name": name, "password": password}
    )
    assert reply.status_code == 303, reply.text
    return client


def attempt_login(base: str, name: str, password: str, address: str = "127.0.0.1") -> httpx.Response:
    """The reply to one login through the form, sent from ``address`` (Linux routes all of 127/8 to lo)."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(base_url=base, transport=transport, follow_redirects=False, timeout=30) as client:
        page = client.get("/login")
        return client.post(
            "/login", data={"csrf": hidden(page.text, "csrf"), "name": name, "password": password}
        )


def next_item(client: httpx.Client) -> tuple[int, str] | None:
    """(item id, its page) of the client's next assignment, or None when nothing is left."""
    reply = client.get("/label")
    if reply.status_code == 200:
        assert "Nothing left to label" in reply.text
        return None
    assert reply.status_code == 303, reply.text
    location = reply.headers["location"]
    page = client.get(location)
    assert page.status_code == 200
    return int(location.rsplit("/", 1)[1]), page.text


def rank_form(page: str, slot_ranks: Sequence[int]) -> dict[str, str]:
    form = {"csrf": hidden(page, "csrf"), "submission_id": hidden(page, "submission_id"), "action": "rank"}
    return form | {f"rank_{slot}": str(r) for slot, r in enumerate(slot_ranks)}


def label_count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM labels").fetchone()[0]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture()
def project(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Six items of three answers (one answer is hostile HTML), overlap 1, two annotators and an admin."""
    items = [(f"Prompt number {i}?", [f"answer {i}-{j}" for j in range(3)]) for i in range(5)]
    items.append(("Show me <i>markup</i>", [XSS, "plain", "other"]))
    db = tmp_path / "fb.sqlite"
    make_project(
        db, items, overlap=1, users={"ann": "annotator", "bob": "annotator", "root": "admin"}
    ).close()
    with live_server(db) as base:
        yield db, base


# ------------------------------------------------------------------------------------------ security
def test_every_route_but_login_refuses_anonymous_requests(project):
    db, base = project
    routes = [r for r in create_app(db).routes if isinstance(r, APIRoute)]
    assert len(routes) >= 9  # the enumeration below covers every route the app declares
    with httpx.Client(base_url=base, follow_redirects=False) as anon:
        for route in routes:
            path = route.path.replace("{item_id}", "1")
            for method in route.methods:
                reply = anon.request(method, path, data={"csrf": "x", "name": "ann", "password": PASSWORD})
                if path == "/login":
                    assert reply.status_code in (200, 403), (method, path)  # 403: no login cookie
                    continue
                if method == "GET":
                    assert (reply.status_code, reply.headers.get("location")) == (303, "/login"), path
                else:
                    assert reply.status_code == 401, (method, path)
                assert "answer 0-" not in reply.text and "Prompt number" not in reply.text
        assert anon.get("/docs").status_code == 404 and anon.get("/openapi.json").status_code == 404
    with httpx.Client(
        base_url=base, follow_redirects=False, cookies={"rlhfkit_session": "made-up"}
    ) as forged:
        assert forged.post("/label/1", data={"action": "skip"}).status_code == 401
        assert forged.get("/admin").headers["location"] == "/login"
    assert label_count(db) == 0


def test_annotators_see_and_write_only_their_own_items(project):
    db, base = project
    ann, bob = login(base, "ann"), login(base, "bob")
    item_ann, page_ann = next_item(ann)
    item_bob, page_bob = next_item(bob)
    assert item_ann != item_bob
    stolen = ann.get(f"/label/{item_bob}")
    assert stolen.status_code == 403 and f"answer {item_bob - 1}-" not in stolen.text
    # ann's own (valid) CSRF token and a well-formed ranking, aimed at bob's item
    forged = ann.post(f"/label/{item_bob}", data=rank_form(page_ann, [1, 2, 3]))
    assert forged.status_code == 403 and label_count(db) == 0
    for path in ("/admin", "/admin/export?format=pairs"):
        assert ann.get(path).status_code == 403
    csrf = hidden(page_ann, "csrf")
    created = ann.post(
        "/admin/users", data={"csrf": csrf, "name": "eve", "role": "admin", "password": "x" * 9}
    )
    assert created.status_code == 403
    assert (
        bob.post(f"/label/{item_bob}", data=rank_form(page_bob, [1, 2, 3])).status_code == 303
    )  # it can pass
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM users WHERE name = 'eve'").fetchone()[0] == 0
        assert conn.execute("SELECT user_id, item_id FROM labels").fetchall() == [(2, item_bob)]


def test_model_text_is_shown_as_text(project):
    _, base = project
    ann = login(base, "ann")
    while (found := next_item(ann)) is not None:
        item_id, page = found
        if "markup" in page:
            break
        ann.post(f"/label/{item_id}", data=rank_form(page, [1, 2, 3]))
    else:
        pytest.fail("the item with hostile HTML was never assigned")
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&#34;window.__xss = 2&#34;&gt;&lt;b&gt;bold&lt;/b&gt;" in page
    assert "Show me &lt;i&gt;markup&lt;/i&gt;" in page
    assert "<script>window" not in page and "<img" not in page and "<i>" not in page
    # the only script on the page is ours, allowed by a nonce the policy names
    reply = ann.get(f"/label/{item_id}")
    nonce = re.search(r"script-src 'nonce-([^']+)'", reply.headers["content-security-policy"]).group(1)
    assert re.findall(r"<script[^>]*>", reply.text) == [f'<script nonce="{nonce}">']


def test_cross_site_posts_are_refused(project):
    db, base = project
    ann = login(base, "ann")
    item_id, page = next_item(ann)
    form = rank_form(page, [2, 1, 3])
    no_token = {k: v for k, v in form.items() if k != "csrf"}
    assert ann.post(f"/label/{item_id}", data=no_token).status_code == 403
    assert ann.post(f"/label/{item_id}", data=form | {"csrf": "A" * 43}).status_code == 403
    evil = {"Origin": "http://evil.example"}
    assert ann.post(f"/label/{item_id}", data=form, headers=evil).status_code == 403
    assert ann.post(f"/label/{item_id}", data=form, headers={"Origin": "null"}).status_code == 403
    assert ann.post("/logout", data={}).status_code == 403
    assert label_count(db) == 0
    same_site = {"Origin": base}
    assert ann.post(f"/label/{item_id}", data=form, headers=same_site).status_code == 303
    assert label_count(db) == 1
    # the login form needs its own double-submit cookie: a cross-site login POST has none
    with httpx.Client(base_url=base) as other:
        reply = other.post("/login", data={"csrf": "A" * 43, "name": "ann", "password": PASSWORD})
        assert reply.status_code == 403 and "rlhfkit_session" not in reply.cookies


def test_cookies_and_stored_secrets(project):
    db, base = project
    with httpx.Client(base_url=base, follow_redirects=False) as client:
        page = client.get("/login")
        bad = client.post(
            "/login", data={"csrf": hidden(page.text, "csrf"), "name": "ann", "password": "wrong"}
        )
        assert bad.status_code == 401 and "Wrong name or password" in bad.text
        page = client.get("/login")
        good = client.post(
            "/login", data={"csrf": hidden(page.text, "csrf"), "name": "ann", "password": PASSWORD}
        )
        cookie = next(c for c in good.headers.get_list("set-cookie") if c.startswith("rlhfkit_session="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        token = cookie.split(";")[0].split("=", 1)[1]
        with sqlite3.connect(db) as conn:
            hashes = [r[0] for r in conn.execute("SELECT password_hash FROM users")]
            sessions = [r[0] for r in conn.execute("SELECT token_hash FROM sessions")]
        assert all(h.startswith("scrypt$") and PASSWORD not in h for h in hashes)
        assert len(set(hashes)) == len(hashes)  # salted: equal passwords, different hashes
        assert token not in sessions and len(sessions) == 1
        home = client.get("/label")
        csrf = hidden(client.get(home.headers["location"]).text, "csrf")
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
        assert client.get("/label").headers["location"] == "/login"  # the session is gone server-side
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0


def set_cookies(client: httpx.Client, headers: dict[str, str] | None = None) -> dict[str, str]:
    """{name: Set-Cookie header} of a login through the form as ann. The login cookie is sent back by hand:
    a client on http:// would rightly keep a Secure one to itself."""
    page = client.get("/login", headers=headers)
    login_cookie = page.cookies["rlhfkit_login_csrf"]
    form = {"csrf": hidden(page.text, "csrf"), "name": "ann", "password": PASSWORD}
    sent = (headers or {}) | {"Cookie": f"rlhfkit_login_csrf={login_cookie}"}
    reply = client.post("/login", data=form, headers=sent)
    assert reply.status_code == 303, reply.text
    found = {}
    for response in (page, reply):
        for header in response.headers.get_list("set-cookie"):
            found.setdefault(header.split("=", 1)[0], header)
    return found


def is_secure(set_cookie: str) -> bool:
    return "secure" in [part.strip().lower() for part in set_cookie.split(";")]


@pytest.mark.parametrize(
    ("secure_cookies", "client", "trusted", "proto", "expected"),
    [
        (True, "10.0.0.9", "127.0.0.1", None, True),  # --secure-cookies: always
        (False, "10.0.0.9", "127.0.0.1", None, False),  # plain HTTP (a development server): never
        (False, "10.0.0.2", "10.0.0.2", "https", True),  # TLS, as a trusted proxy says
        (False, "127.0.0.1", "127.0.0.1", "https", True),  # the default trusts the local host
        (False, "10.0.0.9", "10.0.0.2", "https", False),  # anyone else's header is ignored
        (False, "10.0.0.2", "10.0.0.2", "http", False),  # the proxy says plain HTTP
    ],
)
def test_cookies_are_secure_with_the_flag_or_behind_a_trusted_tls_proxy(
    tmp_path: Path, secure_cookies: bool, client: str, trusted: str, proto: str | None, expected: bool
):
    from fastapi.testclient import TestClient

    db = tmp_path / "fb.sqlite"
    make_project(db, [("P", ["a", "b"])], overlap=1, users={"ann": "annotator"}).close()
    app = create_app(db, secure_cookies=secure_cookies, forwarded_allow_ips=trusted)
    headers = {"X-Forwarded-Proto": proto} if proto else None
    with TestClient(app, client=(client, 50000), follow_redirects=False) as http:
        cookies = set_cookies(http, headers)
        assert set(cookies) == {"rlhfkit_login_csrf", "rlhfkit_session"}
        assert all(is_secure(c) == expected for c in cookies.values()), cookies
        assert "HttpOnly" in cookies["rlhfkit_session"] and "SameSite=strict" in cookies["rlhfkit_session"]


def test_feedback_serve_trusts_forwarded_headers_only_from_its_proxies(tmp_path: Path):
    """The command's own server: X-Forwarded-Proto counts from --forwarded-allow-ips (here the default,
    127.0.0.1), not from 127.0.0.2."""
    db = tmp_path / "fb.sqlite"
    make_project(db, [("P", ["a", "b"])], overlap=1, users={"ann": "annotator"}).close()
    port = free_port()
    command = [sys.executable, "-m", "rlhfkit.cli", "feedback", "serve", "--db", str(db), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    proxied = {"X-Forwarded-Proto": "https"}
    try:
        wait_until_up(server, f"{base}/login", timeout=60)
        for address, expected in (("127.0.0.1", True), ("127.0.0.2", False)):
            transport = httpx.HTTPTransport(local_address=address)
            with httpx.Client(base_url=base, transport=transport, follow_redirects=False) as client:
                cookie = set_cookies(client, proxied)["rlhfkit_session"]
                assert is_secure(cookie) == expected, (address, cookie)
    finally:
        server.kill()
        server.wait(timeout=30)


@pytest.mark.slow
def test_labelling_flow_and_admin_page(project):
    db, base = project
    ann = login(base, "ann")
    outcomes = []
    for action in ("rank", "tie-all", "all_bad", "skip", "rank"):
        item_id, page = next_item(ann)
        if action == "tie-all":
            reply = ann.post(f"/label/{item_id}", data=rank_form(page, [1, 1, 1]))
            assert reply.status_code == 400 and "tied every answer" in reply.text
            reply = ann.post(f"/label/{item_id}", data=rank_form(page, [1, 1, 2]))  # a tie is fine
        elif action == "rank":
            reply = ann.post(f"/label/{item_id}", data=rank_form(page, [3, 1, 2]))
        else:
            form = {
                "csrf": hidden(page, "csrf"),
                "submission_id": hidden(page, "submission_id"),
                "action": action,
            }
            reply = ann.post(f"/label/{item_id}", data=form)
        outcomes.append(reply.status_code)
        again = ann.post(
            f"/label/{item_id}", data=rank_form(page, [1, 2, 3]) | {"submission_id": uuid.uuid4().hex}
        )
        assert again.status_code == 409  # a second, different label for the same item: the first is kept
    assert outcomes == [303] * 5
    assert "Done: <strong>5</strong>" in ann.get(f"/label/{next_item(ann)[0]}").text
    with sqlite3.connect(db) as conn:
        kinds = [r[0] for r in conn.execute("SELECT kind FROM labels ORDER BY id")]
    assert kinds == ["rank", "rank", "all_bad", "skip", "rank"]

    root = login(base, "root")
    admin = root.get("/admin")
    assert admin.status_code == 200 and "3 rankings, 1 all bad, 1 skipped" in admin.text
    assert ann.get("/admin").status_code == 403
    csrf = hidden(admin.text, "csrf")
    added = root.post(
        "/admin/users", data={"csrf": csrf, "name": "carol", "role": "annotator", "password": "pw12345678"}
    )
    assert added.status_code == 200 and "Added annotator &#39;carol&#39;" in added.text
    assert next_item(login(base, "carol", "pw12345678")) is not None  # the new account works
    exported = root.get("/admin/export", params={"format": "rankings"})
    with store.connect(db) as conn:
        assert exported.text == to_jsonl(export_rows(conn, "rankings"))
    assert len(exported.text.splitlines()) == 3


# ------------------------------------------------------------------------------------------ login throttling
@pytest.fixture()
def clocked(tmp_path: Path) -> Iterator[tuple[str, list[float]]]:
    """(base URL, now): a server with accounts ann and bob whose throttle reads its time from ``now[0]``."""
    db = tmp_path / "fb.sqlite"
    make_project(db, [("P", ["a", "b"])], overlap=1, users={"ann": "annotator", "bob": "annotator"}).close()
    now = [1000.0]
    with live_server(db, clock=lambda: now[0]) as base:
        yield base, now


@pytest.mark.slow
def test_failed_logins_lock_the_account_until_the_window_passes(clocked):
    base, now = clocked
    for i in range(10):  # one failure from each of 10 addresses: only the account's count can lock
        now[0] += 1  # failures at t = 1001 ... 1010
        assert attempt_login(base, "ann", f"wrong {i}", f"127.0.1.{i}").status_code == 401
    now[0] += 0.5
    locked = attempt_login(base, "ann", PASSWORD, "127.0.2.1")  # the right password, a fresh address
    assert locked.status_code == 429 and "rlhfkit_session" not in locked.cookies
    assert locked.headers["retry-after"] == "51"  # the failure at 1001 leaves the window at 1061
    assert "try again" in locked.text and len(locked.text) < 100
    assert attempt_login(base, "bob", PASSWORD, "127.0.2.1").status_code == 303  # other names are not locked
    now[0] += 50  # 1060.5: the 10 failures are all still in the window
    assert attempt_login(base, "ann", PASSWORD, "127.0.2.1").headers["retry-after"] == "1"
    now[0] += 1
    assert attempt_login(base, "ann", PASSWORD, "127.0.2.1").status_code == 303


@pytest.mark.slow
def test_failed_logins_lock_the_address(project):
    _, base = project
    for name in [*(f"nobody{i}" for i in range(8)), "bob", "root"]:  # unknown and real names alike
        assert attempt_login(base, name, "wrong password", "127.0.3.1").status_code == 401
    locked = attempt_login(base, "ann", PASSWORD, "127.0.3.1")
    assert locked.status_code == 429 and 1 <= int(locked.headers["retry-after"]) <= 60
    assert attempt_login(base, "ann", PASSWORD, "127.0.3.2").status_code == 303  # another address may


@pytest.mark.slow
def test_a_login_clears_the_accounts_failures_not_the_addresses(project):
    _, base = project
    for _ in range(9):
        assert attempt_login(base, "ann", "wrong password", "127.0.4.1").status_code == 401
    assert attempt_login(base, "ann", PASSWORD, "127.0.4.1").status_code == 303
    for _ in range(9):  # 18 failures for ann in all, but only 9 since her login
        assert attempt_login(base, "ann", "wrong password", "127.0.4.2").status_code == 401
    assert attempt_login(base, "ann", PASSWORD, "127.0.4.2").status_code == 303
    # 127.0.4.1 kept its 9 failures: one more locks it
    assert attempt_login(base, "nobody", "wrong password", "127.0.4.1").status_code == 401
    assert attempt_login(base, "bob", PASSWORD, "127.0.4.1").status_code == 429


def test_failed_and_refused_logins_are_logged_without_the_password(tmp_path: Path, caplog):
    db = tmp_path / "fb.sqlite"
    make_project(db, [("P", ["a", "b"])], overlap=1, users={"ann": "annotator"}).close()
    with live_server(db, login_failures=2) as base, caplog.at_level(logging.INFO, logger="rlhfkit.feedback"):
        for password in ("hunter2-first", "hunter2-second"):
            assert attempt_login(base, "ann", password, "127.0.5.1").status_code == 401
        assert attempt_login(base, "ann", PASSWORD, "127.0.5.1").status_code == 429
    records = [r for r in caplog.records if r.name == "rlhfkit.feedback"]
    messages = [r.getMessage() for r in records]
    assert len(messages) == 3, messages
    assert all("'ann'" in m and "127.0.5.1" in m for m in messages)
    assert "throttled" in messages[2] and "throttled" not in messages[0]
    logged = " ".join(messages + [repr(r.args) for r in records])
    assert "hunter2" not in logged and PASSWORD not in logged


def test_the_throttle_keeps_its_memory_bounded():
    now = [0.0]
    throttle = LoginThrottle(limit=3, window=60, max_keys=5, clock=lambda: now[0])
    for i in range(20):
        now[0] += 1
        throttle.failed(f"name{i}", "10.0.0.1")
    assert list(throttle._names) == [f"name{i}" for i in range(15, 20)]  # the 5 latest names
    assert len(throttle._addresses["10.0.0.1"]) == 3  # no more times per key than the limit
    now[0] = 76.5  # name15 failed at t = 16, name16 at 17: only name15 has left the window
    throttle.failed("late", "10.0.0.2")
    assert list(throttle._names) == [f"name{i}" for i in range(16, 20)] + ["late"]
    now[0] = 200
    throttle.failed("later", "10.0.0.3")
    assert list(throttle._names) == ["later"] and list(throttle._addresses) == ["10.0.0.3"]


# ------------------------------------------------------------------------------------------ concurrency
@pytest.mark.slow
def test_parallel_annotators_lose_and_double_nothing(tmp_path: Path):
    """20 annotators label 260 items x overlap 2 = 520 labels at once; about 1 in 6 submissions is sent twice
    in a row (a retry) and 1 in 10 twice at the same moment (a double click), and some annotators try a
    second, different label for an item they already did (refused). The database must hold exactly the
    acknowledged labels, with the ranks each annotator submitted, and every item exactly N labels."""
    n_annotators, n_items, overlap = 20, 260, 2
    names = [f"a{i:02d}" for i in range(n_annotators)]
    db = tmp_path / "fb.sqlite"
    items = [(f"Prompt {i}", [f"a{i}", f"b{i}", f"c{i}"]) for i in range(n_items)]
    conn = make_project(db, items, overlap, dict.fromkeys(names, "annotator"))
    secret = store.get_meta(conn, "secret")
    user_ids = {u.name: u.id for u in store.users(conn)}
    conn.close()
    acked: dict[tuple[str, int], tuple[str, list[int]]] = {}  # (name, item) -> (submission id, slot ranks)
    refused: list[int] = []
    lock = threading.Lock()

    def annotate(name: str) -> None:
        rng = random.Random(name)
        with closing(login(base, name)) as client, ThreadPoolExecutor(2) as pair:
            csrf = hidden(next_item(client)[1], "csrf")  # one token per session
            # an API-style client: ask for the next item, post its label with a client-made submission id
            while (reply := client.get("/label")).status_code == 303:
                item_id = int(reply.headers["location"].rsplit("/", 1)[1])
                ranks = [1, 1, 1]
                while len(set(ranks)) < 2:  # ties allowed, all tied is not a ranking
                    ranks = [rng.randint(1, 3) for _ in range(3)]
                form = {"csrf": csrf, "submission_id": uuid.uuid4().hex, "action": "rank"}
                form |= {f"rank_{slot}": str(r) for slot, r in enumerate(ranks)}
                url, roll = f"/label/{item_id}", rng.random()
                if roll < 0.1:  # double click: the same form twice at once
                    replies = list(pair.map(lambda _, u=url, f=form: client.post(u, data=f), range(2)))
                elif roll < 0.27:  # retry after a reply that (say) never arrived
                    replies = [client.post(url, data=form), client.post(url, data=form)]
                else:
                    replies = [client.post(url, data=form)]
                assert all(r.status_code == 303 for r in replies), [r.text for r in replies]
                with lock:
                    acked[name, item_id] = (form["submission_id"], ranks)
                if rng.random() < 0.05:
                    other = form | {"submission_id": uuid.uuid4().hex, "rank_0": "3", "rank_1": "1"}
                    refused.append(client.post(url, data=other).status_code)
            assert "Nothing left to label" in reply.text

    started = time.perf_counter()
    with live_server(db) as base, ThreadPoolExecutor(n_annotators) as pool:
        list(pool.map(annotate, names))
    elapsed = time.perf_counter() - started

    assert len(acked) == n_items * overlap >= 500
    assert refused and set(refused) == {409}
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT u.name, l.item_id, l.submission_id, l.ranks FROM labels l "
            "JOIN users u ON u.id = l.user_id"
        ).fetchall()
        per_item = conn.execute("SELECT count(*) FROM labels GROUP BY item_id").fetchall()
    stored = {(name, item): (sid, json.loads(ranks)) for name, item, sid, ranks in rows}
    assert len(rows) == len(stored) == len(acked)  # none doubled
    assert set(stored) == set(acked)  # none lost, none extra
    for (name, item), (sid, slot_ranks) in acked.items():
        order = display_order(secret, user_ids[name], item, 3)
        levels = sorted(set(slot_ranks))
        by_position = [0] * 3
        for slot, position in enumerate(order):
            by_position[position] = levels.index(slot_ranks[slot])
        assert stored[name, item] == (sid, by_position)
    assert {n for (n,) in per_item} == {overlap} and len(per_item) == n_items
    assert elapsed < 60, f"took {elapsed:.1f}s"


# ------------------------------------------------------------------------------------------ durability
def test_a_killed_server_keeps_every_acknowledged_label(tmp_path: Path):
    """`rlhfkit feedback serve` in its own process, SIGKILLed right after its last reply: every label it
    acknowledged is in the database (each one was committed, with fsync, before the reply was sent)."""
    db = tmp_path / "fb.sqlite"
    make_project(db, [(f"P{i}", ["a", "b"]) for i in range(30)], 1, {"ann": "annotator"}).close()
    port = free_port()
    command = [sys.executable, "-m", "rlhfkit.cli", "feedback", "serve", "--db", str(db), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, f"{base}/login", timeout=60)
        ann = login(base, "ann")
        acked = 0
        for _ in range(20):
            item_id, page = next_item(ann)
            acked += ann.post(f"/label/{item_id}", data=rank_form(page, [2, 1])).status_code == 303
    finally:
        server.kill()
        server.wait(timeout=30)
    assert acked == 20 and label_count(db) == 20
