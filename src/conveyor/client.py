"""A Python client of the job API that keeps Conveyor's promises across a flaky network.

Every submit carries an ``Idempotency-Key`` (one is made up if none is given), so a submit sent
again after a dropped connection, a 503 or a 429 is the same request, never a second one. An
event stream that drops is read again after the last event received (``Last-Event-ID``): no gap,
no repeat. ``result`` long-polls until the request has ended. Refusals raise what they are:
``RejectedError`` with the gateway's code (a 4xx), ``NotFoundError`` (an unknown id), and
``UnavailableError`` once the retries are spent.

    async with Client("http://127.0.0.1:8000") as client:
        rid = await client.submit("Write a haiku about queues", max_tokens=64)
        async for event in client.events(rid):
            print(event.text, end="")
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self

import httpx
import orjson

from conveyor.errors import NotFoundError, RejectedError, UnavailableError
from conveyor.view import TERMINAL, RequestView

__all__ = ["Client", "Event"]

# Answers that say "not now": the same call may succeed later (and a submit is safe to repeat).
_AGAIN = frozenset({429, 502, 503, 504})


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One event of a request's stream: ``kind`` is accepted, prepared, generating, token, or the
    final completed, failed or cancelled (whose ``data`` is the outcome)."""

    id: int
    kind: str
    data: dict[str, Any]

    @property
    def text(self) -> str:
        """A token event's text ("" for the others)."""
        return str(self.data.get("text", "")) if self.kind == "token" else ""

    @property
    def final(self) -> bool:
        return self.kind in TERMINAL


class _Again(Exception):
    """An answer worth asking again for, after ``delay`` seconds if the server said."""

    def __init__(self, status: int, delay: float | None) -> None:
        super().__init__(f"the gateway answered {status}")
        self.delay = delay


class Client:
    """The job API of the gateway at ``base_url``. ``retries`` bounds how many times a call is
    tried again (with backoff from ``backoff`` seconds, doubling, or the server's Retry-After);
    a stream that makes progress starts counting again. ``transport`` is httpx's, for proxies,
    mounts or tests."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout, read=None),  # a stream may be quiet between keepalives
            transport=transport,
        )
        self._retries, self._backoff = retries, backoff

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def submit(self, prompt: str, *, idempotency_key: str | None = None, **fields: Any) -> str:
        """Submit ``prompt`` with the job API's other ``fields`` (max_tokens, key, temperature, ...);
        its id once it is durably on the log."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = await self._call(
            "POST", "/v1/requests", json={"prompt": prompt, **fields}, headers=headers
        )
        return str(response.json()["id"])

    async def status(self, request_id: str) -> RequestView:
        """The request as it is now."""
        response = await self._call("GET", f"/v1/requests/{request_id}")
        return RequestView.model_validate_json(response.content)

    async def result(self, request_id: str, *, timeout: float | None = None) -> RequestView:
        """The request once it has ended (or as it is after ``timeout`` seconds)."""
        loop = asyncio.get_running_loop()
        give_up = None if timeout is None else loop.time() + timeout
        while True:
            wait = 60.0 if give_up is None else max(0.0, min(60.0, give_up - loop.time()))
            response = await self._call("GET", f"/v1/requests/{request_id}", params={"wait": wait})
            view = RequestView.model_validate_json(response.content)
            if view.terminal or (give_up is not None and loop.time() >= give_up):
                return view

    async def cancel(self, request_id: str) -> RequestView:
        """Cancel the request: generation stops at its next token. One that has already ended
        stays as it was; either way, the request as it is."""
        await self._call("DELETE", f"/v1/requests/{request_id}", allow={409})
        return await self.status(request_id)

    async def events(self, request_id: str, *, after: int = 0) -> AsyncIterator[Event]:
        """The request's events after event ``after``, to its final one; a dropped stream is
        read again from where it stopped."""
        failures, delay = 0, self._backoff
        while True:
            headers = {"Last-Event-ID": str(after)} if after else {}
            try:
                async with self._http.stream(
                    "GET", f"/v1/requests/{request_id}/events", headers=headers
                ) as response:
                    if response.status_code in _AGAIN:
                        raise _Again(response.status_code, _retry_after(response))
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for(response)
                    async for event in _parse(response):
                        after, failures, delay = event.id, 0, self._backoff
                        yield event
                        if event.final:
                            return
                # Ended before the final event (a gateway going away): read it again, as a drop.
                raise httpx.RemoteProtocolError("the event stream ended before its final event")
            except (httpx.TransportError, _Again) as exc:
                failures += 1
                if failures > self._retries:
                    raise UnavailableError(
                        f"the event stream of {request_id} keeps failing: {exc!r}"
                    ) from exc
                await asyncio.sleep(exc.delay if isinstance(exc, _Again) and exc.delay else delay)
                delay = min(2 * delay, 5.0)

    async def stream(self, prompt: str, **fields: Any) -> AsyncIterator[Event]:
        """Submit ``prompt`` (as ``submit``) and its events to the final one, from ``accepted``."""
        request_id = await self.submit(prompt, **fields)
        async for event in self.events(request_id):
            yield event

    async def _call(
        self, method: str, path: str, *, allow: frozenset[int] | set[int] = frozenset(), **options: Any
    ) -> httpx.Response:
        """One call, tried again while the network or the gateway says "not now"."""
        delay = self._backoff
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                response = await self._http.request(method, path, **options)
            except httpx.TransportError as exc:
                if last:
                    raise UnavailableError(
                        f"{method} {path}: the gateway cannot be reached: {exc!r}"
                    ) from exc
                await asyncio.sleep(delay)
            else:
                if response.status_code in _AGAIN and not last:
                    await asyncio.sleep(_retry_after(response) or delay)
                elif response.status_code >= 400 and response.status_code not in allow:
                    _raise_for(response)
                else:
                    return response
            delay = min(2 * delay, 5.0)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def _raise_for(response: httpx.Response) -> None:
    """Raise what a 4xx or 5xx answer means."""
    try:
        error = orjson.loads(response.content)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code, message = f"http_{response.status_code}", response.text[:500]
    if response.status_code == 404 and code != "model_not_found":  # that one refuses a submit
        raise NotFoundError(message)
    if response.status_code in _AGAIN or response.status_code >= 500:
        raise UnavailableError(f"{response.status_code} {code}: {message}")
    raise RejectedError(code, f"{response.status_code} {code}: {message}")


async def _parse(response: httpx.Response) -> AsyncIterator[Event]:
    """The Server-Sent Events of ``response``."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in fields:
                yield Event(
                    int(fields.get("id", "0")), fields.get("event", "message"), orjson.loads(fields["data"])
                )
            fields = {}
        elif not line.startswith(":"):  # a comment: a keepalive
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
