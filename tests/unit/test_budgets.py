"""Monthly budgets: what a tenant spent at the models' prices, and the submits refused once it is all
spent."""

from __future__ import annotations

import datetime
from pathlib import Path

import openai
import pytest

from conveyor import spend
from conveyor.config import ModelSettings
from conveyor.events import new_event
from conveyor.files import dumps
from conveyor.payloads import EventType, GenerationCompleted, Usage
from conveyor.stages import finalize_stage
from conveyor.testing import MemoryEventLog, MemoryStateStore, StageHarness
from conveyor.usage import Price
from tests.conftest import NodeFactory
from tests.helpers import sdk
from tests.unit.test_gateway_access import ACME, GLOBEX, bearer, globex_goes_on, sdk_refusal, write_keys

UTC = datetime.UTC


def test_a_month_ends_at_the_first_of_the_next_in_utc() -> None:
    at = datetime.datetime(2026, 12, 31, 23, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=-5)))
    assert spend.month(at) == "2027-01"  # already January in UTC
    assert spend.next_month(at) == datetime.datetime(2027, 2, 1, tzinfo=UTC)
    assert spend.next_month(datetime.datetime(2026, 11, 28, tzinfo=UTC)) == datetime.datetime(
        2026, 12, 1, tzinfo=UTC
    )


async def test_finalize_adds_each_requests_cost_to_its_tenants_month_once() -> None:
    store = MemoryStateStore()
    finalize = StageHarness(finalize_stage({"m": Price(1.0, 2.0)}), log=MemoryEventLog(), store=store)
    counts = Usage(prompt_tokens=100, completion_tokens=50)
    made = [
        new_event(
            type=EventType.GENERATED,
            source="test",
            payload=GenerationCompleted(text="x", usage=counts, cached=cached),
            tenant=tenant,
            model="m",
        )
        for tenant, cached in (("acme", False), ("acme", False), ("acme", True), ("globex", False))
    ]
    for event in made:
        await finalize.handle(event)
    await finalize.handle(made[0])  # redelivered: its usage record is there, nothing is added
    now = datetime.datetime.now(UTC)
    assert await spend.spent(store, "acme", now) == pytest.approx(2 * 200 / 1e6)  # the cached one is free
    assert await spend.spent(store, "globex", now) == pytest.approx(200 / 1e6)
    assert await spend.spent(store, "acme", spend.next_month(now)) == 0.0  # next month starts at 0


async def test_a_tenant_that_spent_its_budget_is_refused_until_next_month_and_the_others_go_on(
    node: NodeFactory, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path, f"{ACME}=acme,budget=0.00001\n{GLOBEX}=globex\n")
    model = ModelSettings(backend="simulated", price_prompt=100.0, price_completion=100.0)
    async with (
        node(settings={"api_keys_file": keys, "model": model}) as http,
        sdk(str(http.base_url), ACME) as client,
    ):
        first = await http.post(
            "/v1/requests", params={"wait": 30}, json={"prompt": "hi"}, headers=bearer(ACME)
        )
        assert first.json()["cost_usd"] > 0.00001  # this one was let through: nothing was spent yet
        refused = await http.post("/v1/requests", json={"prompt": "again"}, headers=bearer(ACME))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"
        assert (
            "USD spent this month, all of the tenant's budget of 1e-05" in refused.json()["error"]["message"]
        )
        until_next_month = spend.next_month(datetime.datetime.now(UTC)) - datetime.datetime.now(UTC)
        assert abs(int(refused.headers["Retry-After"]) - until_next_month.total_seconds()) < 60
        assert await sdk_refusal(client) == "insufficient_quota"
        # Nor may it start a batch of thousands.
        line = {"model": "simulated", "messages": [{"role": "user", "content": "x"}]}
        lines = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": line}]
        uploaded = await client.files.create(file=("in.jsonl", dumps(lines)), purpose="batch")
        with pytest.raises(openai.RateLimitError) as spent:
            await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert spent.value.code == "insufficient_quota"
        await globex_goes_on(http)  # globex has no budget


async def test_a_tenant_sees_its_limits_and_what_it_used_of_them(node: NodeFactory, tmp_path: Path) -> None:
    keys = write_keys(tmp_path, f"{ACME}=acme,rate=50,tpm=100000,parallel=8,budget=5\n{GLOBEX}=globex\n")
    model = ModelSettings(backend="simulated", price_prompt=1.0, price_completion=1.0)
    async with node(settings={"api_keys_file": keys, "model": model}) as http:
        done = await http.post(
            "/v1/requests", params={"wait": 30}, json={"prompt": "hi"}, headers=bearer(ACME)
        )
        view = done.json()
        acme = (await http.get("/v1/me", headers=bearer(ACME))).json()
        globex = (await http.get("/v1/me", headers=bearer(GLOBEX))).json()
        assert (await http.get("/v1/me")).status_code == 401
    total = view["usage"]["prompt_tokens"] + view["usage"]["completion_tokens"]
    # Counted once the usage record reaches this gateway's watch of the ledger: moments after.
    assert acme.pop("tokens_last_minute") in (0, total)
    assert acme == {
        "tenant": "acme",
        "month": spend.month(datetime.datetime.now(UTC)),
        "spent_usd": pytest.approx(view["cost_usd"]),
        "budget_usd": 5.0,
        "rate_per_second": 50.0,
        "rate_burst": 50.0,
        "tokens_per_minute": 100000,
        "max_parallel": 8,
        "under_way": 0,
        "models": None,
    }
    assert globex["tenant"] == "globex"
    assert (globex["spent_usd"], globex["budget_usd"], globex["rate_per_second"]) == (0.0, None, None)
