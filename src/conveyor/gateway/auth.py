"""API keys: which tenant a request belongs to.

The keys file has one ``key=tenant`` line per key, optionally followed by the tenant's own
rate limit (``conveyor.gateway.ratelimit``), tokens per minute (``conveyor.gateway.quota``),
requests under way at once (``conveyor.gateway.parallel``), USD a month (``conveyor.spend``) and the
models (or aliases) it may ask for, by id, ``|``-separated (all of them without ``models=``)::

    # comments and blank lines are ignored
    sk-live-8f2c…=acme
    sk-live-19ab…=globex,rate=5,burst=10,models=small|chat
    sk-live-77d0…=initech,tpm=20000,parallel=8,budget=250

A key may contain anything but commas and white space (``=`` too: the tenant is after the
last one); a tenant is 1-64 letters, digits, ``_``, ``.`` or ``-``. Only sha256 digests of the
keys are kept in memory.

A running gateway reads the file again when it changes (``KeysFile``), so keys are added, revoked
and given other limits without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

from conveyor.gateway.ratelimit import Rate

_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KNOWN = ("rate=R", "burst=B", "tpm=T", "parallel=N", "budget=USD", "models=ID|ID")
_OPTIONS = tuple(option.partition("=")[0] for option in _KNOWN)
_WHOLE = {"tpm": "tokens per minute", "parallel": "requests under way at once"}
_INDEX = 8  # bytes of a digest the lookup table is keyed by
logger = logging.getLogger("conveyor.gateway")
K = TypeVar("K")
V = TypeVar("V")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key", "").strip() or None


class Keys(Protocol):
    """Who a key belongs to, and the limits some tenants have of their own."""

    @property
    def rates(self) -> Mapping[str, Rate]: ...

    @property
    def token_limits(self) -> Mapping[str, int]: ...

    @property
    def parallel_limits(self) -> Mapping[str, int]: ...

    @property
    def budgets(self) -> Mapping[str, float]: ...

    @property
    def models(self) -> Mapping[str, frozenset[str]]:
        """The models (or aliases) a tenant may ask for; a tenant not here may ask for any."""
        ...

    def tenant(self, key: str) -> str | None: ...


class ApiKeys:
    """The tenants of the configured keys, and the rate limits some tenants have of their own."""

    def __init__(
        self,
        tenants: Mapping[bytes, str],
        rates: Mapping[str, Rate],
        token_limits: Mapping[str, int] | None = None,
        parallel_limits: Mapping[str, int] | None = None,
        budgets: Mapping[str, float] | None = None,
        models: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        """``tenants``: sha256 digest of a key -> its tenant."""
        self._tenants: dict[bytes, list[tuple[bytes, str]]] = {}
        for digest, tenant in tenants.items():
            self._tenants.setdefault(digest[:_INDEX], []).append((digest, tenant))
        self.rates: Mapping[str, Rate] = dict(rates)
        self.token_limits: Mapping[str, int] = dict(token_limits or {})
        self.parallel_limits: Mapping[str, int] = dict(parallel_limits or {})
        self.budgets: Mapping[str, float] = dict(budgets or {})
        self.models: Mapping[str, frozenset[str]] = dict(models or {})

    @classmethod
    def parse(cls, text: str, *, source: str = "API keys") -> ApiKeys:
        tenants: dict[bytes, str] = {}
        rates: dict[str, Rate] = {}
        token_limits: dict[str, int] = {}
        parallel_limits: dict[str, int] = {}
        budgets: dict[str, float] = {}
        models: dict[str, frozenset[str]] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}, line {number}"  # never the line itself: it holds a key
            first, *options = (part.strip() for part in line.split(","))
            key, _, tenant = (part.strip() for part in first.rpartition("="))
            if not key or any(c.isspace() for c in key):
                raise ValueError(f"{where}: expected key=tenant[,OPTION=VALUE...]")
            if not _TENANT.fullmatch(tenant):
                raise ValueError(f"{where}: a tenant is 1-64 letters, digits, '_', '.' or '-'")
            digest = _digest(key)
            if digest in tenants:
                raise ValueError(f"{where}: this key is listed twice")
            tenants[digest] = tenant
            allowed = [option for option in options if option.startswith("models=")]
            if allowed:
                named = frozenset(m.strip() for m in allowed[-1].removeprefix("models=").split("|"))
                if len(allowed) > 1 or "" in named:
                    raise ValueError(f"{where}: models=ID|ID once, with no empty id")
                if models.setdefault(tenant, named) != named:
                    raise ValueError(f"{where}: tenant {tenant!r} was given other models before")
            values = _options([option for option in options if option not in allowed], where)
            for name, limits in (("tpm", token_limits), ("parallel", parallel_limits)):
                if name in values:
                    limit = int(values.pop(name))
                    if limits.setdefault(tenant, limit) != limit:
                        raise ValueError(f"{where}: tenant {tenant!r} was given another {name} before")
            if "budget" in values:
                budget = values.pop("budget")
                if budget <= 0:
                    raise ValueError(f"{where}: budget must be above 0 USD a month")
                if budgets.setdefault(tenant, budget) != budget:
                    raise ValueError(f"{where}: tenant {tenant!r} was given another budget before")
            if values:
                if "rate" not in values:
                    raise ValueError(f"{where}: burst=B needs rate=R")
                rate = Rate.of(values["rate"], values.get("burst"))
                if rates.setdefault(tenant, rate) != rate:
                    raise ValueError(f"{where}: tenant {tenant!r} was given another rate limit before")
        if not tenants:
            raise ValueError(f"{source}: no keys (lines key=tenant)")
        return cls(tenants, rates, token_limits, parallel_limits, budgets, models)

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
            raise ValueError(f"{where}: unknown or repeated option {name!r}; known: {', '.join(_KNOWN)}")
        try:
            values[name] = float(value)
        except ValueError:
            raise ValueError(f"{where}: {name} must be a number") from None
    for name, what in _WHOLE.items():
        if (number := values.get(name, 1.0)) < 1 or not number.is_integer():
            raise ValueError(f"{where}: {name} must be a whole number of {what}, 1 or more")
    return values


class KeysFile:
    """The keys of a keys file, read again when it changes. A key not known is looked up after a
    fresh read (a key just added works on its first use); otherwise the file is read at most once
    every ``interval`` seconds (a key removed is refused within that). A file that no longer
    reads keeps the keys it had, and the log says why. The tenants' limits are live views, so the
    rate limiter, the token and the parallel limits apply a changed limit at once."""

    def __init__(
        self, path: Path, *, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._path, self._interval, self._clock = path, interval, clock
        self._seen: str | None = self._read()  # the file as last read (None: it could not be)
        self._keys = ApiKeys.parse(self._seen, source=str(path))
        self._checked = clock()
        self.rates: Mapping[str, Rate] = _Live(lambda: self._keys.rates)
        self.token_limits: Mapping[str, int] = _Live(lambda: self._keys.token_limits)
        self.parallel_limits: Mapping[str, int] = _Live(lambda: self._keys.parallel_limits)
        self.budgets: Mapping[str, float] = _Live(lambda: self._keys.budgets)
        self.models: Mapping[str, frozenset[str]] = _Live(lambda: self._keys.models)

    def tenant(self, key: str) -> str | None:
        if self._clock() - self._checked >= self._interval:
            self._reload()
        tenant = self._keys.tenant(key)
        if tenant is None and self._reload():
            tenant = self._keys.tenant(key)
        return tenant

    def _read(self) -> str:
        try:
            return self._path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {self._path}: {exc.strerror}") from exc

    def _reload(self) -> bool:
        """Read the file again; whether its keys changed. What is wrong with it is said once."""
        self._checked = self._clock()
        text: str | None = None
        try:
            text = self._read()
        except ValueError as exc:
            problem = str(exc)
        if text == self._seen:
            return False
        self._seen = text
        if text is not None:
            try:
                self._keys = ApiKeys.parse(text, source=str(self._path))
            except ValueError as exc:
                problem = str(exc)
            else:
                logger.warning("API keys reloaded from %s", self._path)
                return True
        logger.error("API keys not reloaded, the keys read before stay: %s", problem)
        return False


class _Live(Mapping[K, V]):
    """A mapping that is whatever ``current`` returns at each use."""

    def __init__(self, current: Callable[[], Mapping[K, V]]) -> None:
        self._current = current

    def __getitem__(self, key: K) -> V:
        return self._current()[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())
