"""Who may use the gateway: API keys and tenants, per-tenant rate limits, admission control.

Through a whole node over real HTTP, with the job API and the official `openai` SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
import websockets
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletion
from websockets.exceptions import InvalidStatus

from conveyor.events import Topic
from conveyor.gateway.core import GatewayCore
from conveyor.gateway.quota import TokenQuota
from conveyor.log.nats import NatsEventLog
from conveyor.payloads import RequestAccepted
from conveyor.testing import MemoryEventLog, MemoryStateStore
from tests.conftest import NodeFactory, unique_prefix
from tests.helpers import anthropic_sdk, read_sse, sdk, wait_final

ACME, GLOBEX = "sk-acme-7f3a9c", "sk-globex-41d0e2"
CHAT = {"model": "simulated", "messages": [{"role": "user", "content": "hi"}]}


def write_keys(tmp_path: Path, text: str) -> Path:
    """An API keys file that says ``text``."""
    path = tmp_path / "keys.txt"
    path.write_text(text)
    return path


async def sdk_refusal(client: openai.AsyncOpenAI) -> str | None:
    """The code of the RateLimitError the openai SDK raises for a chat completion."""
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    return refused.value.code


async def globex_goes_on(http: httpx.AsyncClient, body: dict[str, Any] | None = None) -> None:
    """Another tenant's request (``body``, default a short prompt) completes meanwhile."""
    other = await http.post(
        "/v1/requests", params={"wait": 10}, json=body or {"prompt": "hi"}, headers=bearer(GLOBEX)
    )
    assert other.json()["status"] == "completed"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def with_key(client: httpx.AsyncClient, headers: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """Another client of the same gateway that sends ``headers`` with every request."""
    async with httpx.AsyncClient(base_url=client.base_url, headers=headers, timeout=30) as keyed:
        yield keyed


async def chat(client: openai.AsyncOpenAI) -> ChatCompletion:
    return await client.chat.completions.create(
        model="simulated", messages=[{"role": "user", "content": "hi"}]
    )


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return write_keys(tmp_path, f"# tenants\n{ACME}=acme\n{GLOBEX}=globex\n")


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"


async def test_without_a_valid_key_every_api_request_is_401(node: NodeFactory, keys_file: Path) -> None:
    async with node(settings={"api_keys_file": keys_file}) as client:
        for headers in ({}, bearer("sk-wrong"), {"X-API-Key": "sk-wrong"}, {"Authorization": ACME}):
            assert_unauthorized(await client.post("/v1/requests", json={"prompt": "hi"}, headers=headers))
            for path in ("/v1/requests/some-id", "/v1/requests/some-id/events"):
                assert_unauthorized(await client.get(path, headers=headers))
            assert_unauthorized(await client.delete("/v1/requests/some-id", headers=headers))
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
                response = await client.request(method, path, json=CHAT, headers=headers)
                assert response.status_code == 401
                assert response.headers["www-authenticate"] == "Bearer"
                error = response.json()["error"]
                assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        ws_url = str(client.base_url).replace("http://", "ws://") + "/v1/requests/some-id/ws"
        with pytest.raises(InvalidStatus) as denied:
            await websockets.connect(ws_url, additional_headers=bearer("sk-wrong"))
        assert denied.value.response.status_code == 401
        # What operators and browsers need stays open.
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path


async def test_the_anthropic_sdk_sends_its_key_and_gets_its_own_error(
    node: NodeFactory, keys_file: Path
) -> None:
    asked: list[MessageParam] = [{"role": "user", "content": "hi"}]
    async with node(settings={"api_keys_file": keys_file}) as http:
        async with anthropic_sdk(str(http.base_url), "sk-wrong") as client:
            with pytest.raises(anthropic.AuthenticationError) as raised:
                await client.messages.create(model="simulated", max_tokens=8, messages=asked)
        async with anthropic_sdk(str(http.base_url), GLOBEX) as client:
            message = await client.messages.create(model="simulated", max_tokens=8, messages=asked)
        async with with_key(http, bearer(GLOBEX)) as globex:
            view = await wait_final(globex, message.id.removeprefix("msg_"))
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "the API key is not valid"},
    }
    assert view["tenant"] == "globex"  # the key in x-api-key named the tenant


async def test_the_openai_sdk_raises_authentication_error(node: NodeFactory, keys_file: Path) -> None:
    async with node(settings={"api_keys_file": keys_file}) as http:
        async with sdk(str(http.base_url), "sk-wrong") as client:
            with pytest.raises(openai.AuthenticationError) as raised:
                await chat(client)
            assert raised.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with sdk(str(http.base_url), ACME) as client:
            assert [m.id async for m in client.models.list()] == ["simulated"]
            completion = await chat(client)
        async with with_key(http, bearer(ACME)) as acme:
            view = await wait_final(acme, completion.id.removeprefix("chatcmpl-"))
        assert view["tenant"] == "acme"


async def test_a_tenant_sees_only_its_own_requests(node: NodeFactory, keys_file: Path) -> None:
    async with (
        node(settings={"api_keys_file": keys_file}, token_delay=0.01) as client,
        with_key(client, bearer(ACME)) as acme,
        with_key(client, {"X-API-Key": GLOBEX}) as globex,
    ):
        response = await acme.post("/v1/requests", json={"prompt": "mine", "max_tokens": 200})
        assert response.status_code == 202
        rid = response.json()["id"]
        # Another tenant cannot tell the id from one that does not exist.
        unknown = {"error": {"code": "not_found", "message": f"no request with id {rid!r}"}}
        for method, path in (
            ("GET", f"/v1/requests/{rid}"),
            ("GET", f"/v1/requests/{rid}/events"),
            ("DELETE", f"/v1/requests/{rid}"),
        ):
            response = await globex.request(method, path)
            assert (response.status_code, response.json()) == (404, unknown)
        ws_url = str(client.base_url).replace("http://", "ws://") + f"/v1/requests/{rid}/ws"
        async with websockets.connect(ws_url, additional_headers={"X-API-Key": GLOBEX}) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4404
        async with websockets.connect(ws_url, additional_headers=bearer(ACME)) as ws:
            assert orjson.loads(await ws.recv())["event"] == "accepted"
        view = await wait_final(acme, rid)
        assert (view["status"], view["tenant"]) == ("completed", "acme")  # not cancelled by globex
        assert (await read_sse(acme, rid))[-1][1] == "completed"


async def test_idempotency_keys_belong_to_their_tenant(node: NodeFactory, keys_file: Path) -> None:
    async with node(settings={"api_keys_file": keys_file}) as client:
        idem = {"Idempotency-Key": "order-1"}
        first = await client.post("/v1/requests", json={"prompt": "a"}, headers=bearer(ACME) | idem)
        other = await client.post("/v1/requests", json={"prompt": "b"}, headers=bearer(GLOBEX) | idem)
        again = await client.post("/v1/requests", json={"prompt": "a"}, headers=bearer(ACME) | idem)
    assert (first.status_code, other.status_code, again.status_code) == (202, 202, 200)
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]


async def submit_status(client: httpx.AsyncClient, prompt: str, **headers: str) -> httpx.Response:
    return await client.post("/v1/requests", json={"prompt": prompt}, headers=headers)


async def test_a_tenant_over_its_rate_gets_429_with_retry_after(node: NodeFactory) -> None:
    # 0.001 per second: the third submit would have to wait about 1000 s.
    async with node(settings={"rate_limit": 0.001, "rate_burst": 2}) as client:
        first = await client.post("/v1/requests", json={"prompt": "one"}, headers={"Idempotency-Key": "k1"})
        second = await client.post("/v1/requests", json={"prompt": "two"})
        assert (first.status_code, second.status_code) == (202, 202)
        refused = await client.post("/v1/requests", json={"prompt": "three"})
        assert refused.status_code == 429
        assert 990 <= int(refused.headers["retry-after"]) <= 1000
        assert refused.json()["error"]["code"] == "rate_limited"
        # A retried submit was admitted the first time: it takes no token and is not refused.
        again = await client.post("/v1/requests", json={"prompt": "one"}, headers={"Idempotency-Key": "k1"})
        assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
        # Only submits count: reads and streams go on.
        assert (await wait_final(client, first.json()["id"]))["status"] == "completed"
        assert (await read_sse(client, second.json()["id"]))[-1][1] == "completed"
        assert 'conveyor_gateway_refused_total{code="rate_limited"}' in (await client.get("/metrics")).text


async def test_a_tenants_own_rate_from_the_keys_file_and_the_sdks_rate_limit_error(
    node: NodeFactory, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path, f"{ACME}=acme,rate=0.001,burst=1\n{GLOBEX}=globex\n")
    async with node(settings={"api_keys_file": keys}) as http:
        async with sdk(str(http.base_url), ACME) as client:
            await chat(client)
            with pytest.raises(openai.RateLimitError) as raised:
                await chat(client)
        error = raised.value
        assert (error.type, error.code) == ("requests", "rate_limit_exceeded")
        assert 990 <= int(error.response.headers["retry-after"]) <= 1000
        # globex has no rate of its own and there is no default: unlimited.
        for i in range(5):
            response = await http.post("/v1/requests", json={"prompt": f"p{i}"}, headers=bearer(GLOBEX))
            assert response.status_code == 202


async def metric(client: httpx.AsyncClient, line: str, *, within: float = 10.0) -> None:
    """Wait until /metrics shows ``line`` (the admission task refreshes twice a second)."""
    deadline = time.monotonic() + within
    while line not in (await client.get("/metrics")).text.splitlines():
        assert time.monotonic() < deadline, f"/metrics never showed {line!r}"
        await asyncio.sleep(0.05)


async def test_submits_get_503_while_prepare_is_too_far_behind(node: NodeFactory, nats_url: str) -> None:
    prefix = unique_prefix()
    settings: dict[str, Any] = {
        "log_url": nats_url,
        "prefix": prefix,
        "stages": ("generate", "finalize", "projector"),  # no prepare: requests pile up
        "max_backlog": 2,
    }
    intake_log = await NatsEventLog.open(nats_url, prefix=prefix)
    try:
        # prepare's consumer group exists (as once a prepare worker has run); nobody takes from it.
        await (await intake_log.subscribe(Topic.REQUESTS, "prepare")).close()
        async with node(settings=settings) as client:
            await metric(client, "conveyor_gateway_overloaded 0.0")
            rids = [(await submit_status(client, f"p{i}")).json()["id"] for i in range(3)]
            await metric(client, "conveyor_gateway_overloaded 1.0")
            assert "conveyor_gateway_backlog 3.0" in (await client.get("/metrics")).text.splitlines()
            refused = await submit_status(client, "one too many")
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
            async with sdk(str(client.base_url), "unused") as openai_client:
                with pytest.raises(openai.InternalServerError) as raised:
                    await chat(openai_client)
            assert (raised.value.status_code, raised.value.code) == (503, "overloaded")
            status = await client.get(f"/v1/requests/{rids[0]}")
            assert status.json()["status"] == "accepted"  # reads go on

            # prepare catches up: submits are accepted again.
            intake = await intake_log.subscribe(Topic.REQUESTS, "prepare")
            taken = 0
            while taken < 3:
                for delivery in await intake.fetch(10, timeout=5):
                    await delivery.ack()
                    taken += 1
            await intake.close()
            await metric(client, "conveyor_gateway_overloaded 0.0")
            assert (await submit_status(client, "welcome back")).status_code == 202
    finally:
        await intake_log.delete_streams()
        await intake_log.close()


async def test_the_tenant_travels_on_the_accepted_event_and_scopes_the_view() -> None:
    log = MemoryEventLog()
    core = GatewayCore(log, MemoryStateStore())
    accepted = await core.accept(RequestAccepted(prompt="bill acme"), tenant="acme")
    assert [event.tenant for event in log.events(Topic.REQUESTS)] == ["acme"]  # and so into usage
    view = await core.view(accepted.id, tenant="acme")
    assert view is not None
    assert view.tenant == "acme"
    assert await core.view(accepted.id, tenant="globex") is None


def test_a_token_window_says_how_long_until_a_tenant_is_under_its_limit_again() -> None:
    now = [0.0]
    quota = TokenQuota(MemoryStateStore(), default=100, tenants={"big": 1000}, clock=lambda: now[0])
    quota.add("acme", 60)
    now[0] = 20.0
    quota.add("acme", 50)
    assert quota.used("acme") == 110
    assert quota.wait("acme") == pytest.approx(40.0)  # when the 60 leave
    quota.add("big", 500)
    assert quota.wait("big") == 0.0  # a limit of its own
    now[0] = 60.0
    assert (quota.used("acme"), quota.wait("acme")) == (50, 0.0)
    assert TokenQuota(MemoryStateStore(), tenants={"big": 1}).limit("acme") is None  # no default: none


async def test_a_tenant_over_its_tokens_per_minute_is_refused_until_they_age_and_the_others_go_on(
    node: NodeFactory, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path, f"{ACME}=acme,tpm=40\n{GLOBEX}=globex\n")
    async with node(settings={"api_keys_file": keys}) as http, sdk(str(http.base_url), ACME) as client:
        refused = None
        for _ in range(20):  # ~10-30 tokens each: refused within a few, once their usage is counted
            answer = await http.post(
                "/v1/requests",
                params={"wait": 10},
                json={"prompt": "count me in", "max_tokens": 24},
                headers=bearer(ACME),
            )
            if answer.status_code == 429:
                refused = answer
                break
            assert answer.json()["status"] == "completed"
        assert refused is not None
        assert refused.json()["error"]["code"] == "token_limit"
        assert "over the limit of 40 tokens per minute" in refused.json()["error"]["message"]
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        assert await sdk_refusal(client) == "rate_limit_exceeded"
        await globex_goes_on(http)  # globex has no limit


async def test_a_tenant_at_its_parallel_limit_is_refused_until_one_ends_and_the_others_go_on(
    node: NodeFactory, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path, f"{ACME}=acme,parallel=2\n{GLOBEX}=globex\n")
    slow = {"prompt": "slow one"}  # 23 tokens at 0.5 s: under way for 11 s unless cancelled
    quick = {"prompt": "hi", "max_tokens": 1}
    async with (
        node(token_delay=0.5, settings={"api_keys_file": keys}) as http,
        sdk(str(http.base_url), ACME) as client,
    ):
        first = [
            (await http.post("/v1/requests", json=slow, headers=bearer(ACME))).json()["id"] for _ in "ab"
        ]
        refused = await http.post("/v1/requests", json=slow, headers=bearer(ACME))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "parallel_limit"
        assert "2 requests under way" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"] == "1"
        assert await sdk_refusal(client) == "rate_limit_exceeded"
        await globex_goes_on(http, quick)  # another tenant is not held back by acme's requests
        # Once one of acme's ends (here: cancelled), acme may submit one more, and no more.
        await http.delete(f"/v1/requests/{first[0]}", headers=bearer(ACME))
        assert (await wait_final(http, first[0], headers=bearer(ACME)))["status"] == "cancelled"
        # The gateway learns of an end from its status watch, in the order views are written:
        # once it has told a waiter of a later end, it has seen that one.
        later = await http.post("/v1/requests", params={"wait": 10}, json=quick, headers=bearer(GLOBEX))
        assert later.json()["status"] == "completed"
        again = await http.post("/v1/requests", json=slow, headers=bearer(ACME))
        assert again.status_code == 202
        assert (await http.post("/v1/requests", json=slow, headers=bearer(ACME))).status_code == 429
        for rid in (first[1], again.json()["id"]):  # not left to run out while the node stops
            await http.delete(f"/v1/requests/{rid}", headers=bearer(ACME))
            await wait_final(http, rid, headers=bearer(ACME))


async def test_a_key_added_to_the_keys_file_of_a_running_gateway_works_on_its_first_use(
    node: NodeFactory, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path, f"{ACME}=acme\n")
    async with node(settings={"api_keys_file": keys}) as http:
        assert (
            await http.post("/v1/requests", json={"prompt": "hi"}, headers=bearer(GLOBEX))
        ).status_code == 401
        keys.write_text(f"{ACME}=acme\n{GLOBEX}=globex,rate=100\n")  # no restart
        added = await http.post(
            "/v1/requests", params={"wait": 10}, json={"prompt": "hi"}, headers=bearer(GLOBEX)
        )
        assert added.status_code == 200
        assert added.json()["tenant"] == "globex"
