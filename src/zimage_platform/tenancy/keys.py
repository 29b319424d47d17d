"""API keys: shown once, stored only as an HMAC with a server-side secret, compared in constant time.

A key looks like ``zk_<key id>_<secret>``. The key id (not secret) finds the stored record
without scanning every tenant; the secret part is 32 random bytes, so a fast keyed hash
(HMAC-SHA256 with the platform's pepper) is the right tool — slow password hashes only help
against guessable inputs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "zk"
_KEY_RE = re.compile(r"^zk_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    #: The raw key: give it to the caller once, never store it.
    raw: str
    hash: str


def hash_secret(secret: str, pepper: bytes) -> str:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def issue_key(pepper: bytes) -> IssuedKey:
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return IssuedKey(key_id=key_id, raw=f"{PREFIX}_{key_id}_{secret}", hash=hash_secret(secret, pepper))


def parse_key(raw: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else ``None``."""
    match = _KEY_RE.match(raw.strip())
    return (match.group(1), match.group(2)) if match else None


def verify_secret(secret: str, stored_hash: str, pepper: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret, pepper), stored_hash)
