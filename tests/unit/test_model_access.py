"""Which models a tenant may use: ``models=`` in the keys file, held by every API."""

from __future__ import annotations

from pathlib import Path

import anthropic
import openai
import pytest

from conveyor.config import ModelSettings
from conveyor.files import dumps
from tests.conftest import NodeFactory
from tests.helpers import anthropic_sdk, sdk
from tests.unit.test_gateway_access import ACME, GLOBEX, bearer, write_keys

pytestmark = pytest.mark.timeout(30)

SERVED = {
    "model": ModelSettings(backend="simulated", name="big"),
    "models": (ModelSettings(backend="simulated", name="small"),),
    "aliases": {"chat": (("small", 1.0),)},
}


async def test_a_tenant_uses_only_its_models_and_sees_only_them(node: NodeFactory, tmp_path: Path) -> None:
    keys = write_keys(tmp_path, f"{ACME}=acme,models=small|chat\n{GLOBEX}=globex\n")
    async with node(settings={"api_keys_file": keys, **SERVED}) as http:
        # The job API: the default model (big) is not acme's; small is.
        refused = await http.post("/v1/requests", json={"prompt": "hi"}, headers=bearer(ACME))
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "model_not_allowed"
        assert "may use ['chat', 'small']" in refused.json()["error"]["message"]
        done = await http.post(
            "/v1/requests", params={"wait": 30}, json={"prompt": "hi", "model": "small"}, headers=bearer(ACME)
        )
        assert done.json()["status"] == "completed"
        # Its view of the deployment, and its account, list only what it may use.
        listed = (await http.get("/v1/models", headers=bearer(ACME))).json()
        assert [m["id"] for m in listed["data"]] == ["small", "chat"]
        assert (await http.get("/v1/models/big", headers=bearer(ACME))).status_code == 404
        assert (await http.get("/v1/me", headers=bearer(ACME))).json()["models"] == ["chat", "small"]
        # globex has no restriction.
        everything = (await http.get("/v1/models", headers=bearer(GLOBEX))).json()
        assert [m["id"] for m in everything["data"]] == ["big", "small", "chat"]
        assert (await http.get("/v1/me", headers=bearer(GLOBEX))).json()["models"] is None

        base = str(http.base_url)
        async with sdk(base, ACME) as client:
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await client.chat.completions.create(model="big", messages=[{"role": "user", "content": "x"}])
            assert denied.value.code == "model_not_allowed"
            aliased = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "x"}]
            )
            assert aliased.model == "chat"
            with pytest.raises(openai.PermissionDeniedError):
                await client.embeddings.create(model="big", input="x")
            # Nor through a batch: the line that asks for another model refuses the batch.
            line = {"model": "big", "messages": [{"role": "user", "content": "x"}]}
            lines = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": line}]
            uploaded = await client.files.create(file=("in.jsonl", dumps(lines)), purpose="batch")
            with pytest.raises(
                openai.BadRequestError, match="line 1: this API key may not use the model 'big'"
            ):
                await client.batches.create(
                    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
        async with anthropic_sdk(base, ACME) as claude:
            with pytest.raises(anthropic.PermissionDeniedError):
                await claude.messages.create(
                    model="big", max_tokens=8, messages=[{"role": "user", "content": "x"}]
                )
        async with sdk(base, GLOBEX) as client:
            answer = await client.chat.completions.create(
                model="big", messages=[{"role": "user", "content": "x"}]
            )
            assert answer.choices[0].message.content
