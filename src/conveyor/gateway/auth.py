"""API keys: which tenant a request belongs to.

The keys file has one ``key=tenant`` line per key, optionally followed by the tenant's own
rate limit (``conveyor.gateway.ratelimit``), tokens per minute (``conveyor.gateway.quota``) and
requests under way at once (``conveyor.gateway.parallel``)::

    # comments and blank lines are ignored
    sk-live-8f2c…=acme
    sk-live-19ab…=globex,rate=5,burst=10
    sk-live-77d0…=initech,tpm=20000,parallel=8

A key may contain anything but commas and white space (``=`` too: the tenant is after the
last one); a tenant is 1-64 letters, digits, ``_``, ``.`` or ``-``. Only sha256 digests of the
keys are kept in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from pathlib import Path

from conveyor.gateway.ratelimit import Rate

_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_OPTIONS = ("rate", "burst", "tpm", "parallel")
_WHOLE = {"tpm": "tokens per minute", "parallel": "requests under way at once"}
_INDEX = 8  # bytes of a digest the lookup table is keyed by


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key", "").strip() or None


class ApiKeys:
    """The tenants of the configured keys, and the rate limits some tenants have of their own."""

    def __init__(
        self,
        tenants: Mapping[bytes, str],
        rates: Mapping[str, Rate],
        token_limits: Mapping[str, int] | None = None,
        parallel_limits: Mapping[str, int] | None = None,
    ) -> None:
        """``tenants``: sha256 digest of a key -> its tenant."""
        self._tenants: dict[bytes, list[tuple[bytes, str]]] = {}
        for digest, tenant in tenants.items():
            self._tenants.setdefault(digest[:_INDEX], []).append((digest, tenant))
        self.rates: Mapping[str, Rate] = dict(rates)
        self.token_limits: Mapping[str, int] = dict(token_limits or {})
        self.parallel_limits: Mapping[str, int] = dict(parallel_limits or {})

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {path}: {exc.strerror}") from exc
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "API keys") -> ApiKeys:
        tenants: dict[bytes, str] = {}
        rates: dict[str, Rate] = {}
        token_limits: dict[str, int] = {}
        parallel_limits: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}, line {number}"  # never the line itself: it holds a key
            first, *options = (part.strip() for part in line.split(","))
            key, _, tenant = (part.strip() for part in first.rpartition("="))
            if not key or any(c.isspace() for c in key):
                raise ValueError(f"{where}: expected key=tenant[,rate=R,burst=B,tpm=T,parallel=N]")
            if not _TENANT.fullmatch(tenant):
                raise ValueError(f"{where}: a tenant is 1-64 letters, digits, '_', '.' or '-'")
            digest = _digest(key)
            if digest in tenants:
                raise ValueError(f"{where}: this key is listed twice")
            tenants[digest] = tenant
            values = _options(options, where)
            for name, limits in (("tpm", token_limits), ("parallel", parallel_limits)):
                if name in values:
                    limit = int(values.pop(name))
                    if limits.setdefault(tenant, limit) != limit:
                        raise ValueError(f"{where}: tenant {tenant!r} was given another {name} before")
            if values:
                if "rate" not in values:
                    raise ValueError(f"{where}: burst=B needs rate=R")
                rate = Rate.of(values["rate"], values.get("burst"))
                if rates.setdefault(tenant, rate) != rate:
                    raise ValueError(f"{where}: tenant {tenant!r} was given another rate limit before")
        if not tenants:
            raise ValueError(f"{source}: no keys (lines key=tenant)")
        return cls(tenants, rates, token_limits, parallel_limits)

    def tenant(self, key: str) -> str | None:
        """The tenant of ``key``, or None for an unknown key."""
        digest = _digest(key)
        # Found by the first bytes of its digest, confirmed by a constant-time comparison of the
        # whole digest: no timing depends on the key itself, nor on how much of one matched.
        for stored, tenant in self._tenants.get(digest[:_INDEX], ()):
            if hmac.compare_digest(stored, digest):
                return tenant
        return None


def _options(options: list[str], where: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for option in options:
        name, _, value = option.partition("=")
        if name not in _OPTIONS or name in values:
            raise ValueError(
                f"{where}: unknown or repeated option {name!r}; known: rate=R, burst=B, tpm=T, parallel=N"
            )
        try:
            values[name] = float(value)
        except ValueError:
            raise ValueError(f"{where}: {name} must be a number") from None
    for name, what in _WHOLE.items():
        if (number := values.get(name, 1.0)) < 1 or not number.is_integer():
            raise ValueError(f"{where}: {name} must be a whole number of {what}, 1 or more")
    return values
