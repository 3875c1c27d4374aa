"""Shared helpers for tests that talk to a gateway over HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import orjson


async def submit(client: httpx.AsyncClient, prompt: str, **fields: Any) -> str:
    response = await client.post("/v1/requests", json={"prompt": prompt, **fields})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def wait_final(client: httpx.AsyncClient, rid: str, *, wait: float = 30) -> dict[str, Any]:
    response = await client.get(f"/v1/requests/{rid}", params={"wait": wait})
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    assert view["status"] in ("completed", "failed", "cancelled"), view
    return view


async def read_sse(
    client: httpx.AsyncClient, rid: str, *, last_event_id: str | None = None, stop_after: int | None = None
) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of every SSE event until the final one (or ``stop_after`` events)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[tuple[int, str, dict[str, Any]]] = []
    async with client.stream("GET", f"/v1/requests/{rid}/events", headers=headers) as response:
        assert response.status_code == 200
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            events.append((int(fields["id"]), fields["event"], orjson.loads(fields["data"])))
            fields = {}
            if events[-1][1] in ("completed", "failed", "cancelled") or len(events) == stop_after:
                break
    return events


def streamed_text(events: list[tuple[int, str, dict[str, Any]]]) -> str:
    return "".join(data["text"] for _, kind, data in events if kind == "token")
