"""Conveyor's NATS client encodes and parses headers exactly as nats-py does, only cheaper."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.js.api import Header

from conveyor.events import new_event
from conveyor.jetstream import _Client
from conveyor.payloads import EventType, RequestAccepted

EVENT = new_event(
    type=EventType.ACCEPTED,
    source="conveyor/gateway",
    payload=RequestAccepted(prompt="hi"),
    tenant="acme",
    callback="http://127.0.0.1:9/hook?a=1&b=2",
).to_headers()
HEADERS = [
    EVENT,
    {**EVENT, "Nats-Msg-Id": "abc", "Nats-Expected-Last-Subject-Sequence": "0"},
    {Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0", Header.MSG_ID: "m1"},  # nats-py's own names: enums
    {"ce-model": "émoji ✓ model"},  # not ASCII
    {"a": " padded "},  # whitespace nats-py strips
    {"a": ""},
    {"a": "two\r\nlines"},  # a line break nats-py replaces
    {"a": "one\nbreak"},
    {"bad name": "x"},  # refused by nats-py
    {"": "x"},  # skipped by nats-py
]


async def sent(client: Client, headers: dict[str, str]) -> bytes | Exception:
    """The bytes ``client`` writes to publish a message with ``headers``, or what it raised."""
    written: list[bytes] = []

    async def capture(command: bytes, priority: bool = False) -> None:
        written.append(command)

    client._send_command = capture  # type: ignore[method-assign, assignment]
    try:
        await client._send_publish("conveyor.requests.x", "_INBOX.r.1", b'{"prompt":"hi"}', 15, headers)
    except Exception as exc:  # the error itself is what is compared
        return exc
    return b"".join(written)


@pytest.mark.parametrize("headers", HEADERS)
async def test_a_publish_writes_the_bytes_nats_py_writes(headers: dict[str, str]) -> None:
    ours, theirs = await sent(_Client(), headers), await sent(Client(), headers)
    if isinstance(theirs, Exception):
        assert type(ours) is type(theirs)
    else:
        assert ours == theirs


@pytest.mark.parametrize(
    "block",
    [
        b"ce-id: 1\r\nce-type: request.accepted\r\nNats-Msg-Id: abc\r\n\r\n",
        b"a:b\r\nc:\tpadded \r\n\r\n",  # no space after the colon, tabs
        "ce-model: émoji ✓\r\n\r\n".encode(),
        b"bad name: x\r\nok: y\r\n\r\n",  # a name with a space is skipped
        b"\xff\xfe: x\r\nok: \xff\r\n\r\n",  # not UTF-8
        b"no colon here\r\nok: y\r\n\r\n",
        b": empty name\r\n\r\n",
    ],
)
def test_a_header_block_parses_as_nats_py_parses_it(block: bytes) -> None:
    assert _Client._parse_header_lines(block) == Client._parse_header_lines(block)
