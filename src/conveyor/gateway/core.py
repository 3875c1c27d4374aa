"""What both HTTP APIs (the job API and the OpenAI-compatible one) do with requests."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any

import orjson
from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from conveyor.callbacks import LOOPBACK
from conveyor.events import Envelope, Topic, generate_group, new_event, prepared_topic
from conveyor.gateway import access
from conveyor.gateway.admission import Admission
from conveyor.gateway.auth import Keys, presented_key
from conveyor.gateway.backlog import Backlogs
from conveyor.gateway.parallel import ParallelLimit
from conveyor.gateway.quota import TokenQuota
from conveyor.gateway.ratelimit import Rate, RateLimiter
from conveyor.gateway.watch import StatusWatch
from conveyor.log.base import EventLog
from conveyor.log.claim_check import as_published
from conveyor.observability.metrics import REQUESTS_ACCEPTED, REQUESTS_REFUSED
from conveyor.observability.tracing import current_traceparent
from conveyor.payloads import CancelRequested, EventType, RequestAccepted
from conveyor.projector import read_view
from conveyor.spend import Budgets, next_month
from conveyor.store.base import Namespace, StateStore
from conveyor.view import RequestView

SOURCE = "conveyor/gateway"

# Declared on the routes so that /docs offers to authorize; the key is read by ``presented_key``,
# the same way for HTTP and WebSocket requests.
_BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="or X-API-Key: KEY")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GatewayLimits:
    max_body_bytes: int = 256 * 1024
    max_file_bytes: int = 64 * 1024 * 1024  # an uploaded file (a batch's input)
    max_prompt_chars: int = 100_000
    max_tokens: int = 8192
    default_max_tokens: int = 256
    max_wait_seconds: float = 60.0  # the status long poll
    max_completion_seconds: float = 600.0  # a non-streaming chat completion
    rate: Rate | None = None  # submits per tenant (the API keys file may give a tenant its own)
    max_backlog: int | None = None  # refuse submits while prepare is further behind than this
    tokens_per_minute: int | None = None  # per tenant (the API keys file may give a tenant its own)
    max_parallel: int | None = None  # requests under way per tenant, per gateway (likewise)
    budget: float | None = None  # USD per tenant and calendar month, at the models' prices (likewise)
    callback_hosts: tuple[str, ...] = LOOPBACK  # what a callback_url may name (conveyor.callbacks)


class Refused(Exception):
    """A request turned away before it reached the log; each API answers in its own error shape."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        REQUESTS_REFUSED.inc(code=code)

    @property
    def headers(self) -> dict[str, str]:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:  # whole seconds, rounded up: sooner would be refused again
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    replayed: bool  # an Idempotency-Key retry: the request was accepted earlier
    status: str
    view: RequestView | None = None  # with ``wait``: once the request ended, or as it was by then


class GatewayCore:
    def __init__(
        self,
        log: EventLog,
        store: StateStore,
        *,
        keys: Keys | None = None,
        limiter: RateLimiter | None = None,
        admission: Admission | None = None,
        quota: TokenQuota | None = None,
        parallel: ParallelLimit | None = None,
        budgets: Budgets | None = None,
        models: Sequence[str] = (),
        aliases: Mapping[str, Sequence[tuple[str, float]]] | None = None,
        backlogs: Backlogs | None = None,
    ) -> None:
        """With ``backlogs``, an alias sends each request to its model with the least backlog for
        its weight (else each is drawn by weight)."""
        self.log, self.store = log, store
        # The models served, the default first: a request for it names no model on its events.
        self.models = tuple(models)
        self.aliases = dict(aliases or {})
        self.backlogs = backlogs
        self.keys, self.limiter, self.admission, self.quota = keys, limiter, admission, quota
        self.parallel, self.budgets = parallel, budgets
        self.watch = StatusWatch(store, on_write=parallel.seen if parallel else None)
        # Read-your-writes: a request accepted here is "accepted" even before the projector
        # has written its view (a few milliseconds later). (tenant, accepted_at) rather than
        # views: tuples of strings are no work for the garbage collector's full passes.
        self._recent: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()

    def tenant_of(self, headers: Mapping[str, str]) -> str | None:
        """The tenant of the request's API key, None if it has no valid one; without configured
        keys, every request is "default"."""
        if self.keys is None:
            return "default"
        key = presented_key(headers)
        return None if key is None else self.keys.tenant(key)

    def authenticate(self, headers: Mapping[str, str]) -> str:
        """``tenant_of``, or the refusal that says why there is none."""
        tenant = self.tenant_of(headers)
        if tenant is not None:
            return tenant
        if presented_key(headers) is None:
            raise Refused(
                401, "invalid_api_key", "no API key: send 'Authorization: Bearer KEY' (or 'X-API-Key: KEY')"
            )
        raise Refused(401, "invalid_api_key", "the API key is not valid")

    def tenant_dependency(self, refusal: Callable[[Refused], Exception]) -> Callable[..., Awaitable[str]]:
        """A route dependency giving the request's tenant; a missing or unknown key is raised as
        ``refusal`` makes it, so each API answers in its own error shape."""
        if self.keys is None:

            async def anyone() -> str:
                return "default"

            return anyone

        async def tenant(
            request: Request,
            _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
            _api_key: Annotated[str | None, Security(_API_KEY)] = None,
        ) -> str:
            try:
                return self.authenticate(request.headers)
            except Refused as exc:
                raise refusal(exc) from None

        return tenant

    async def _admit(self, tenant: str, rid: str) -> None:
        """Refuse a new submit while the pipeline is overloaded or the tenant is over one of its
        limits; else ``rid`` is one of the tenant's requests under way (``_release`` it if it is
        not put on the log after all)."""
        if self.admission is not None and self.admission.overloaded:
            raise Refused(
                503,
                "overloaded",
                f"the pipeline is {self.admission.backlog} requests behind; retry shortly",
                retry_after=self.admission.interval,
            )
        if self.quota is not None and (wait := self.quota.wait(tenant)) > 0:  # before a rate token is taken
            raise Refused(
                429,
                "token_limit",
                f"over the limit of {self.quota.limit(tenant)} tokens per minute; retry in {wait:.1f} s",
                retry_after=wait,
            )
        await self.check_budget(tenant)
        if self.limiter is not None and (wait := await self.limiter.acquire(tenant)) > 0:
            rate = self.limiter.rate(tenant)
            limit = f" of {rate.per_second:g} requests per second (burst {rate.burst:g})" if rate else ""
            raise Refused(
                429, "rate_limited", f"over the rate limit{limit}; retry in {wait:.2f} s", retry_after=wait
            )
        if self.parallel is not None and not self.parallel.reserve(tenant, rid):  # last: nothing to undo
            raise Refused(
                429,
                "parallel_limit",
                f"{self.parallel.under_way(tenant)} requests under way, the most this tenant may have "
                "at once; retry when one has ended",
                retry_after=1.0,
            )

    async def check_budget(self, tenant: str) -> None:
        """Refused (429) if ``tenant`` has spent its budget for the month."""
        if self.budgets is None:
            return
        now = datetime.datetime.now(datetime.UTC)
        if (used := await self.budgets.spent(tenant, now)) is not None:
            ends = next_month(now)
            raise Refused(
                429,
                "budget_exceeded",
                f"{used:.4f} USD spent this month, all of the tenant's budget of "
                f"{self.budgets.budget(tenant):g}; it starts over on {ends:%Y-%m-%d} (UTC)",
                retry_after=(ends - now).total_seconds(),
            )

    def _release(self, rid: str) -> None:
        """``rid`` is not under way: it failed to reach the log (or is in doubt, and then a retry
        publishes the same event again), or a retry raced it."""
        if self.parallel is not None:
            self.parallel.release(rid)

    def may_use(self, tenant: str) -> frozenset[str] | None:
        """The models and aliases ``tenant`` may ask for; None: every one served."""
        return None if self.keys is None else self.keys.models.get(tenant)

    def check_access(self, tenant: str, model: str) -> None:
        """Refused (403) if ``tenant`` may not ask for ``model`` (empty: the default one)."""
        allowed = self.may_use(tenant)
        asked = model or next(iter(self.models), "")
        if allowed is not None and asked not in allowed:
            raise Refused(
                403,
                "model_not_allowed",
                f"this API key may not use the model {asked!r}; it may use {sorted(allowed)}",
            )

    def route(self, model: str) -> str:
        """What the events of a request for ``model`` (one of ``models``, by id, or an alias of
        some; empty: the default) name as its model: nothing for the default one. An alias's model
        is drawn by weight for each request. Refused (404) for a model not served."""
        if (targets := self.aliases.get(model)) is not None:
            model = self._pick(targets)
        if model and model not in self.models:
            raise Refused(
                404, "model_not_found", f"the model {model!r} does not exist; try {list(self.models)}"
            )
        return "" if model == next(iter(self.models), "") else model

    def _pick(self, targets: Sequence[tuple[str, float]]) -> str:
        """An alias's model for one request: drawn by weight among those with the least backlog per
        unit of weight (a weight is a model's share of the capacity), or among all of them while
        any backlog is not known. A failing upstream holds its requests in retries, so its backlog
        grows and requests go elsewhere."""
        if self.backlogs is not None:
            default = next(iter(self.models), "")
            loads = [
                self.backlogs.of(prepared_topic(route), generate_group(route))
                for route in ("" if m == default else m for m, _ in targets)
            ]
            if all(load is not None for load in loads):
                shares = [(load or 0) / weight for load, (_, weight) in zip(loads, targets, strict=True)]
                targets = [t for t, share in zip(targets, shares, strict=True) if share == min(shares)]
        return random.choices([m for m, _ in targets], weights=[w for _, w in targets])[0]

    async def accept(
        self,
        payload: RequestAccepted,
        *,
        tenant: str = "default",
        key: str | None = None,
        timeout: float | None = None,
        priority: int = 0,
        callback: str = "",
        model: str = "",
        idempotency_key: str | None = None,
        fingerprint: Any = None,
        wait: float = 0.0,
    ) -> Accepted:
        """Put the request on the log (durably, when this returns); raises Refused if it may not.
        With ``wait``, then wait up to that many seconds for it to end (``Accepted.view``).
        ``model``: one of ``models`` by id (empty: the default one)."""
        self.check_access(tenant, model)
        event = new_event(
            type=EventType.ACCEPTED,
            source=SOURCE,
            payload=payload,
            key=key,
            tenant=tenant,
            deadline=time.time() + timeout if timeout else None,
            priority=priority,
            callback=callback,
            model=self.route(model),
            traceparent=current_traceparent(),
        )
        rid = event.id
        idem = digest = ""
        if idempotency_key:
            idem = hashlib.sha256(f"{tenant}\x00{idempotency_key}".encode()).hexdigest()
            digest = hashlib.sha256(orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS)).hexdigest()
            # A retry was admitted the first time: it takes no second token, nor a refusal now.
            existing = await self.store.get(Namespace.IDEMPOTENCY, idem)
            if existing is not None:
                return await self._replay(orjson.loads(existing.value), digest, tenant, wait)
        # Before the key is recorded: a refused submit must leave nothing a retry could replay.
        await self._admit(tenant, rid)
        if idem:
            # The event itself is kept with the key: a retry after a failed or timed-out publish
            # (which may have been stored after all) publishes the very same event again, and the
            # log drops it if the first one made it. Deleting the key instead could bill twice.
            try:
                event = await as_published(self.log, event)  # a long prompt: kept in the blob store
                record = {"id": rid, "fingerprint": digest, "headers": event.to_headers()}
                record["body"] = event.data.decode()
                created = await self.store.create(Namespace.IDEMPOTENCY, idem, orjson.dumps(record))
            except BaseException:
                self._release(rid)
                raise
            if created is None:
                existing = await self.store.get(Namespace.IDEMPOTENCY, idem)
                if existing is not None:  # a retry racing the first: that one is under way
                    self._release(rid)
                    return await self._replay(orjson.loads(existing.value), digest, tenant, wait)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        # Watched before the event is on the log, so no change can slip by: the waiter starts
        # from "accepted" without reading the store (where nothing is written yet).
        with self.watch.subscribe(rid, queue) if wait > 0 else contextlib.nullcontext():
            try:
                await self.log.publish(Topic.REQUESTS, [event])
            except BaseException:
                self._release(rid)
                raise
            REQUESTS_ACCEPTED.inc()
            access.accepted(rid, tenant)
            self._recent[rid] = (tenant, event.time)
            if len(self._recent) > 10_000:
                self._recent.popitem(last=False)
            view = _accepted(rid, tenant, event.time)
            ended = await self._until_ended(rid, queue, view, wait, tenant=tenant) if wait > 0 else None
        return Accepted(rid, False, "accepted", ended)

    async def _replay(self, previous: dict[str, Any], digest: str, tenant: str, wait: float) -> Accepted:
        """An Idempotency-Key seen before: the same request, published again unless it is known."""
        if previous["fingerprint"] != digest:
            raise IdempotencyConflict
        view = await self.view(previous["id"], tenant=tenant)
        if view is None:  # its publish failed or is in doubt: the same event again (deduplicated)
            event = Envelope.from_headers(previous["headers"], previous["body"].encode())
            await self.log.publish(Topic.REQUESTS, [event])
        status = view.status if view else "accepted"
        access.accepted(previous["id"], tenant)
        ended = await self.wait(previous["id"], wait, tenant=tenant) if wait > 0 else None
        return Accepted(previous["id"], True, status, ended)

    async def view(self, rid: str, *, tenant: str) -> RequestView | None:
        """The request's view; None if it is unknown or another tenant's (which is not told apart,
        so a tenant cannot learn which ids exist)."""
        view = await self._view(rid)
        return view if view is not None and view.tenant == tenant else None

    async def _view(self, rid: str) -> RequestView | None:
        view = await read_view(self.store, rid)
        if view is not None:
            return view
        if (recent := self._recent.get(rid)) is not None:
            return _accepted(rid, *recent)
        # Accepted (maybe by another gateway, maybe before a restart) but not projected yet?
        accepted = await self.log.find(Topic.REQUESTS, rid)
        return None if accepted is None else _accepted(rid, accepted.tenant, accepted.time)

    async def wait(self, rid: str, seconds: float, *, tenant: str) -> RequestView | None:
        """The view once the request has ended, or as it is after ``seconds``; None if unknown."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        with self.watch.subscribe(rid, queue):  # before the read, so no change can slip between
            view = await self.view(rid, tenant=tenant)
            return await self._until_ended(rid, queue, view, seconds, tenant=tenant)

    async def _until_ended(
        self, rid: str, queue: asyncio.Queue[Any], view: RequestView | None, seconds: float, *, tenant: str
    ) -> RequestView | None:
        """Follow ``view`` through the watch's ``queue`` until it is final or ``seconds`` passed."""
        deadline = time.monotonic() + seconds
        while view is not None and not view.terminal and (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(min(left, 1.0)):
                    _, view = await queue.get()
            except TimeoutError:
                view = await self.view(rid, tenant=tenant)  # a safety net for a missed notification
        return view

    async def cancel(self, view: RequestView, reason: str = "client") -> None:
        event = new_event(
            type=EventType.CANCEL, source=SOURCE, payload=CancelRequested(reason=reason), request_id=view.id
        )
        await self.log.publish(Topic.CONTROL, [dataclasses.replace(event, tenant=view.tenant)])


def _accepted(rid: str, tenant: str, at: str) -> RequestView:
    """The view of a request on the log that the projector has not written yet."""
    return RequestView(id=rid, tenant=tenant, stages={"gateway": {"accepted_at": at}})
