"""The NATS event log reads a delivery's attempt and position from its ack subject itself."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from conveyor.log.nats import _delivered


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.CONVEYOR_REQUESTS.prepare.3.17.5.1764201600000000000.0",  # no domain (the server's own)
        "$JS.ACK._.4yWn0u1b.CONVEYOR_REQUESTS.prepare.2.99.7.1764201600000000000.4.AbC1",  # v2, no domain
        "$JS.ACK.hub.4yWn0u1b.CONVEYOR_REQUESTS.prepare.1.5.5.1764201600000000000.0.AbC1",  # v2 with a domain
    ],
)
def test_attempt_and_position_are_what_nats_py_reads(reply: str) -> None:
    metadata = Msg(None, subject="inbox", reply=reply).metadata  # type: ignore[arg-type]
    assert _delivered(reply) == (metadata.num_delivered, metadata.sequence.stream)
