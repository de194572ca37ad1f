"""Secrets of the labelling app: password hashes, session tokens, CSRF tokens.

* Passwords are hashed with scrypt (RFC 7914) and a 16-byte random salt. The cost (n=2**14, r=8, p=1,
  16 MiB, about 50 ms here) is what OWASP recommends as a minimum; it is stored in the hash string
  (``scrypt$n$r$p$salt$hash``), so raising it later does not lock anyone out.
* Session tokens are 32 random bytes. The database keeps only their SHA-256: a leaked database does not
  hand out live sessions, and a high-entropy token needs no slow hash (nothing to brute-force).
* Every comparison of a secret goes through ``hmac.compare_digest`` (constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

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
