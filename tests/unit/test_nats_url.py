"""NATS URLs: one server or a cluster's nodes, and the replica count of streams and buckets."""

from __future__ import annotations

import pytest

from conveyor.jetstream import NatsTarget, parse_url


def test_one_server_keeps_one_copy() -> None:
    assert parse_url("nats://127.0.0.1:4222") == NatsTarget(("nats://127.0.0.1:4222",), replicas=1)


def test_a_cluster_lists_every_node_and_asks_for_replicas() -> None:
    url = "nats://127.0.0.1:4222,nats://127.0.0.1:4223, 127.0.0.1:4224?replicas=3"
    assert parse_url(url) == NatsTarget(
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"), replicas=3
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("nats://127.0.0.1:4222?replicas=0", "replicas must be 1 to 5"),
        ("nats://127.0.0.1:4222?replicas=6", "replicas must be 1 to 5"),
        ("nats://127.0.0.1:4222?replicas=three", "replicas must be 1 to 5"),
        ("nats://127.0.0.1:4222?replica=3", "unknown option"),
        ("nats://127.0.0.1:4222,kafka://127.0.0.1:9092", "malformed NATS URL"),
        ("nats://,nats://127.0.0.1:4222", "malformed NATS URL"),
    ],
)
def test_a_malformed_url_is_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_url(url)
