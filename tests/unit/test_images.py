"""Images in a conversation: taken by every API, carried in order through the pipeline (a large one
through the blob store), handed to an OpenAI-compatible upstream as image parts."""

from __future__ import annotations

import base64
import random
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import NodeFactory
from tests.helpers import anthropic_sdk, relaying, sdk

pytestmark = pytest.mark.timeout(30)

# A "photo" of 300 KB inline: over the log's 64 KiB event limit, so it travels in the blob store.
PHOTO = base64.b64encode(random.Random(3).randbytes(300_000)).decode()
PHOTO_URL = f"data:image/png;base64,{PHOTO}"
CHART_URL = "https://example.com/chart.png"  # never fetched here: the upstream would fetch it
LARGE = {"blob_url": "memory://", "max_event_bytes": 64 * 1024}


def contents(body: dict[str, Any]) -> list[Any]:
    return [m["content"] for m in body["messages"]]


async def test_the_openai_api_hands_images_to_the_upstream_in_order_with_the_text_redacted(
    node: NodeFactory,
) -> None:
    async with relaying(node, **LARGE) as (http, received), sdk(str(http.base_url)) as client:
        answer = await client.chat.completions.create(
            model="m",
            messages=[
                {"role": "system", "content": "Describe images."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Mail jane@example.com what this shows: "},
                        {"type": "image_url", "image_url": {"url": PHOTO_URL, "detail": "low"}},
                        {"type": "text", "text": " and compare it with "},
                        {"type": "image_url", "image_url": {"url": CHART_URL}},
                    ],
                },
            ],
        )
    assert answer.choices[0].message.content == "ok"
    (body,) = received
    assert contents(body) == [
        "Describe images.",
        [
            {"type": "text", "text": "Mail [EMAIL] what this shows: "},
            {"type": "image_url", "image_url": {"url": PHOTO_URL, "detail": "low"}},
            {"type": "text", "text": " and compare it with "},
            {"type": "image_url", "image_url": {"url": CHART_URL}},
        ],
    ]


async def test_the_anthropic_api_hands_a_base64_image_on_as_an_inline_image(node: NodeFactory) -> None:
    async with relaying(node, **LARGE) as (http, received), anthropic_sdk(str(http.base_url)) as client:

        async def ask(*content: dict[str, Any]) -> None:
            turn = {"role": "user", "content": list(content)}
            await client.messages.create(model="m", max_tokens=16, messages=[turn])  # type: ignore[list-item]

        photo = {"type": "base64", "media_type": "image/png", "data": PHOTO}
        await ask({"type": "image", "source": photo}, {"type": "text", "text": "What is this?"})
        with pytest.raises(anthropic.BadRequestError, match="image URL"):
            await ask({"type": "image", "source": {"type": "url", "url": "file:///etc/passwd"}})
    (body,) = received
    assert contents(body) == [
        [
            {"type": "image_url", "image_url": {"url": PHOTO_URL}},
            {"type": "text", "text": "What is this?"},
        ]
    ]


async def test_the_responses_api_hands_an_input_image_on(node: NodeFactory) -> None:
    async with relaying(node) as (http, received), sdk(str(http.base_url)) as client:
        await client.responses.create(
            model="m",
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Read the chart: "},
                        {"type": "input_image", "image_url": CHART_URL, "detail": "high"},
                    ],
                }
            ],
        )
    (body,) = received
    assert contents(body) == [
        [
            {"type": "text", "text": "Read the chart: "},
            {"type": "image_url", "image_url": {"url": CHART_URL, "detail": "high"}},
        ]
    ]


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.com/a.png", "data:text/plain;base64,aGk=", "data:image/png,raw"],
)
async def test_an_image_url_no_model_could_read_is_the_clients_error(node: NodeFactory, url: str) -> None:
    async with relaying(node) as (http, received), sdk(str(http.base_url)) as client:
        with pytest.raises(openai.BadRequestError, match="image"):
            await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            )
    assert received == []  # refused at the gateway: nothing reached the log
