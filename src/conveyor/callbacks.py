"""Callbacks: which URLs a request may ask to be called back at, and how each call is signed.

A request submitted with a ``callback_url`` has its outcome POSTed there when it ends
(``conveyor.stages.deliver``). Only the hosts the operator allows are called (loopback alone
unless told otherwise): a deployment must not become a way to make requests to anywhere. With a
secret, each call carries ``Conveyor-Signature: t=<unix seconds>,v1=<hex>``, the HMAC-SHA256 of
``<t>.<body>``; a receiver checks it with ``verify`` (and refuses old timestamps, against replays).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SIGNATURE_HEADER = "Conveyor-Signature"


def refusal(url: str, hosts: Sequence[str]) -> str | None:
    """Why ``url`` may not be called back with ``hosts`` allowed (exact names, or ``*.domain``
    for its subdomains); None if it may."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"callback_url must be an http or https URL, not {url[:100]!r}"
    host = parts.hostname.lower()
    if not any(host == h.lower() or (h.startswith("*.") and host.endswith(h[1:].lower())) for h in hosts):
        allowed = ", ".join(hosts) or "none"
        return f"callback_url's host {host!r} is not one this deployment calls back (allowed: {allowed})"
    return None


def sign(secret: str, body: bytes, at: int | None = None) -> str:
    """The ``Conveyor-Signature`` of ``body`` sent at ``at`` (now by default)."""
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def verify(secret: str, body: bytes, signature: str, *, tolerance: float = 300.0) -> bool:
    """Whether ``signature`` (the header's value) signs ``body`` with ``secret``, sent within
    ``tolerance`` seconds of now."""
    try:
        fields = dict(part.split("=", 1) for part in signature.split(","))
        at = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - at) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, at), f"t={at},v1={fields.get('v1', '')}")
