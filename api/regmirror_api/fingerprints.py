"""Keyed digests of texts that hold a login, for the records regmirror keeps about them.

A plain hash of a file (or a spec) whose only unknown is a weak password gives the password away to whoever reads
the hash. What regmirror records to recognise "the same as last time" (the request key and the digest of what a
plan read, ``regmirror_agent.observing``) therefore uses HMAC-SHA256 with a key this process draws at start and
never writes anywhere: nothing recorded helps guess a password, and this process still notices any change of one.
The price: a new agent or command plans once more instead of trusting an earlier record.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_PROCESS_KEY = secrets.token_bytes(32)


def fingerprint(text: str) -> str:
    return "hmac:" + hmac.new(_PROCESS_KEY, text.encode(), hashlib.sha256).hexdigest()
