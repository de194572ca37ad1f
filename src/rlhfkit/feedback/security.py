"""Secrets of the labelling app: password hashes, session tokens, CSRF tokens, login throttling.

* Passwords are hashed with scrypt (RFC 7914) and a 16-byte random salt. The cost (n=2**14, r=8, p=1,
  16 MiB, about 50 ms here) is what OWASP recommends as a minimum; it is stored in the hash string
  (``scrypt$n$r$p$salt$hash``), so raising it later does not lock anyone out.
* Session tokens are 32 random bytes. The database keeps only their SHA-256: a leaked database does not
  hand out live sessions, and a high-entropy token needs no slow hash (nothing to brute-force).
* Every comparison of a secret goes through ``hmac.compare_digest`` (constant time).
* Failed logins are counted per account name and per client address (``LoginThrottle``): passwords cannot
  be guessed online faster than a few per minute.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_DKLEN = 32


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=_DKLEN
    )


def hash_password(password: str) -> str:
    """A salted scrypt hash in the self-describing form ``scrypt$n$r$p$salt_hex$hash_hex``."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored``; a malformed stored hash never matches."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        candidate = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(candidate, bytes.fromhex(digest))


def dummy_verify(password: str) -> None:
    """Spend the time of one verification, so a login for an unknown name is not faster than a bad password
    (response time would otherwise tell which account names exist)."""
    _scrypt(password, b"\0" * 16, SCRYPT_N, SCRYPT_R, SCRYPT_P)


def new_token() -> str:
    """A URL-safe random token with 256 bits of entropy (sessions, CSRF, submission ids)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the database stores for a session token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same_secret(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets; a missing or empty one never matches."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


class LoginThrottle:
    """Failed logins per account name and per client address over a sliding window, in memory.

    After ``limit`` failures within ``window`` seconds a name (or address) is locked until the oldest of them
    leaves the window. Refused attempts are not counted (no password was checked). Memory is bounded: at most
    ``limit`` times per key, keys whose failures all left the window are dropped as new failures come in, and
    at most ``max_keys`` keys of each kind are kept (the least recently failed go first). Thread-safe.
    """

    def __init__(
        self,
        limit: int = 10,
        window: float = 60.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self.max_keys, self._clock = limit, window, max_keys, clock
        self._lock = threading.Lock()
        self._names: OrderedDict[str, deque[float]] = OrderedDict()
        self._addresses: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, name: str, address: str) -> int:
        """Whole seconds until this name from this address may try again (at least 1); 0 if it may now."""
        with self._lock:
            now = self._clock()
            return max(self._wait(self._names, name, now), self._wait(self._addresses, address, now))

    def failed(self, name: str, address: str) -> None:
        """Count a failed login against the name and the address."""
        with self._lock:
            now = self._clock()
            for table, key in ((self._names, name), (self._addresses, address)):
                times = table.pop(key, None) or deque(maxlen=self.limit)
                times.append(now)
                table[key] = times  # (re)inserted last: the tables are ordered by latest failure
                self._prune(table, now)

    def succeeded(self, name: str) -> None:
        """Forget the name's failures; the address keeps its own (one good account must not unlock it)."""
        with self._lock:
            self._names.pop(name, None)

    def _wait(self, table: OrderedDict[str, deque[float]], key: str, now: float) -> int:
        times = table.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[0] + self.window - now))

    def _prune(self, table: OrderedDict[str, deque[float]], now: float) -> None:
        # ordered by latest failure, so the stale keys are the first ones
        while table:
            first = next(iter(table.values()))
            if len(table) <= self.max_keys and first and first[-1] > now - self.window:
                break
            table.popitem(last=False)
