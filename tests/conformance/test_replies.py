"""``conveyor.jetstream.Replies`` against a real NATS server: answered, unanswered, no one listening."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from conveyor.jetstream import Replies


async def test_each_request_gets_its_own_reply_or_its_own_failure(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    replies = Replies(nc, timeout=0.2)
    try:

        async def echo(msg: Msg) -> None:
            await nc.publish(msg.reply, msg.data.upper())

        await nc.subscribe("test.echo", cb=echo)
        await nc.subscribe("test.silent")  # takes requests and never answers
        await nc.flush()
        lost = await replies.request("test.silent", b"anyone?")
        answered = await asyncio.gather(*[await replies.request("test.echo", b"m%d" % i) for i in range(5)])
        assert [m.data for m in answered] == [b"M%d" % i for i in range(5)]  # each its own
        with pytest.raises(TimeoutError, match=r"no reply from NATS within 0\.2 s"):
            await asyncio.wait_for(lost, 5)
        with pytest.raises(nats.errors.NoRespondersError):
            await asyncio.wait_for(await replies.request("test.nobody"), 5)
    finally:
        await replies.close()
        await nc.close()
