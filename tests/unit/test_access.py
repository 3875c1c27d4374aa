"""Which requests an HTTP call made: ids in the response headers the SDKs read, and the access log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.conftest import NodeFactory
from tests.helpers import anthropic_sdk, sdk
from tests.unit.test_gateway_access import ACME, bearer, write_keys

pytestmark = pytest.mark.timeout(30)

CHAT = [{"role": "user", "content": "hi"}]


async def test_a_call_answers_with_the_ids_of_the_requests_it_made(node: NodeFactory) -> None:
    async with node() as http:
        submitted = await http.post("/v1/requests", json={"prompt": "hi"})
        rid = submitted.json()["id"]
        assert submitted.headers["x-request-id"] == submitted.headers["request-id"] == rid
        # A retry with its Idempotency-Key is the same request: the same id.
        first = await http.post("/v1/requests", json={"prompt": "x"}, headers={"Idempotency-Key": "k1"})
        again = await http.post("/v1/requests", json={"prompt": "x"}, headers={"Idempotency-Key": "k1"})
        assert first.headers["x-request-id"] == again.headers["x-request-id"] == first.json()["id"]
        # A read makes no request: no id.
        assert "x-request-id" not in (await http.get(f"/v1/requests/{rid}")).headers
        base = str(http.base_url)
        async with sdk(base) as client:
            one = await client.chat.completions.create(model="simulated", messages=CHAT)  # type: ignore[arg-type]
            assert one._request_id is not None
            assert (await http.get(f"/v1/requests/{one._request_id}")).json()["status"] == "completed"
            two = await client.chat.completions.create(model="simulated", messages=CHAT, n=2)  # type: ignore[arg-type]
            assert two._request_id is not None
            assert len(set(two._request_id.split(","))) == 2  # one request per choice
            # An embeddings call of many texts makes as many requests: more ids than a header holds.
            many = await client.embeddings.with_raw_response.create(model="simulated", input=["x"] * 20)
            assert "x-request-id" not in many.headers
        async with anthropic_sdk(base) as claude:
            message = await claude.messages.create(model="simulated", max_tokens=8, messages=CHAT)  # type: ignore[arg-type]
            assert message._request_id is not None
            assert (await http.get(f"/v1/requests/{message._request_id}")).status_code == 200


async def test_the_access_log_has_a_line_per_call_with_its_tenant_and_requests(
    node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = write_keys(tmp_path, f"{ACME}=acme\n")
    caplog.set_level(logging.INFO, logger="conveyor.access")
    async with node(settings={"api_keys_file": keys, "access_log": True}) as http:
        rid = (await http.post("/v1/requests", json={"prompt": "hi"}, headers=bearer(ACME))).json()["id"]
        await http.get(f"/v1/requests/{rid}", params={"wait": 30}, headers=bearer(ACME))
        await http.get("/v1/requests/nope", headers=bearer(ACME))
        embedded = await http.post(
            "/v1/embeddings", json={"model": "simulated", "input": ["x"] * 20}, headers=bearer(ACME)
        )
        assert embedded.status_code == 200
    lines = [r for r in caplog.records if r.name == "conveyor.access"]
    said = [(r.method, r.path, r.status, r.tenant, r.requests, r.request_ids) for r in lines]  # type: ignore[attr-defined]
    assert said[:3] == [
        ("POST", "/v1/requests", 202, "acme", 1, [rid]),
        ("GET", f"/v1/requests/{rid}", 200, None, 0, []),
        ("GET", "/v1/requests/nope", 404, None, 0, []),
    ]
    *call, ids = said[3]
    assert (call, len(set(ids))) == (["POST", "/v1/embeddings", 200, "acme", 20], 16)  # the first 16
    assert all(r.duration_ms >= 0 for r in lines)  # type: ignore[attr-defined]
    assert lines[0].getMessage().startswith("POST /v1/requests 202 ")
