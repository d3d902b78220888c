"""Memory names and access tokens.

A memory's token is 32 random bytes (URL-safe base64), shown once when the memory is made;
the server keeps only its SHA-256 (a token has 256 bits of entropy, so a plain hash cannot
be brute-forced; no password stretching is needed). Every check of a token against a
memory takes the same steps whether the memory exists or not (a missing memory is compared
against a dummy hash), so a caller without the right token learns nothing about which names
exist.

Names are what the disk layout is built from, so they are a closed alphabet: 1-64 of
letters, digits, `_` and `-`, starting with a letter or digit (no dots, no slashes: no path
traversal, no hidden files).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from longmem.errors import LongMemError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DUMMY_HASH = hashlib.sha256(b"no memory of this name").hexdigest()


def check_name(name: str) -> str:
    """`name` if it is a valid memory name, else a LongMemError saying what names may be."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise LongMemError(f"invalid memory name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a "
                           f"letter or digit")
    return name


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_matches(token: str | None, stored_hash: str | None) -> bool:
    """Whether `token` is the one whose hash is `stored_hash` (None: no such memory), in constant time."""
    given = hash_token(token or "")
    ok = hmac.compare_digest(given, stored_hash or _DUMMY_HASH)
    return ok and token is not None and stored_hash is not None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
