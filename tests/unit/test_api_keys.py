"""The API keys file: key=tenant lines, per-tenant rates, only digests in memory."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from conveyor.gateway.auth import ApiKeys, KeysFile, presented_key
from conveyor.gateway.ratelimit import Rate

KEYS = """
# production keys
sk-acme-0001=acme
sk-acme-0002 = acme , rate=5, burst=10
c2stYmFzZTY0PT0==globex
"""


def test_keys_map_to_their_tenants_and_unknown_keys_to_none() -> None:
    keys = ApiKeys.parse(KEYS)
    assert keys.tenant("sk-acme-0001") == "acme"
    assert keys.tenant("sk-acme-0002") == "acme"
    assert keys.tenant("c2stYmFzZTY0PT0=") == "globex"  # a key may end in '=': the tenant is after the last
    assert keys.tenant("sk-acme-000") is None
    assert keys.tenant("") is None
    assert keys.rates == {"acme": Rate(5.0, 10.0)}
    assert keys.token_limits == {}
    limited = ApiKeys.parse("sk-1=acme,tpm=500,rate=2\nsk-2=globex,tpm=40,parallel=8")
    assert (limited.token_limits, limited.rates) == ({"acme": 500, "globex": 40}, {"acme": Rate(2.0, 2.0)})
    assert limited.parallel_limits == {"globex": 8}
    assert ApiKeys.parse("sk-1=acme,budget=12.5").budgets == {"acme": 12.5}
    assert ApiKeys.parse("sk-1=acme,models=small|chat,rate=2").models == {"acme": {"small", "chat"}}


def test_only_digests_of_the_keys_are_kept() -> None:
    kept = pickle.dumps(ApiKeys.parse(KEYS))
    assert b"sk-acme-0001" not in kept
    assert b"c2stYmFzZTY0PT0" not in kept


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("sk-1", "line 1: expected key=tenant"),
        ("=acme", "line 1: expected key=tenant"),
        ("sk 1=acme", "line 1: expected key=tenant"),
        ("sk-1=", "line 1: a tenant is"),
        ("sk-1=ac me", "line 1: a tenant is"),
        ("sk-1=acme\nsk-1=globex", "line 2: this key is listed twice"),
        ("sk-1=acme,rate=5\nsk-2=acme,rate=6", "line 2: tenant 'acme' was given another rate limit"),
        ("sk-1=acme,burst=5", "line 1: burst=B needs rate=R"),
        ("sk-1=acme,rate=fast", "line 1: rate must be a number"),
        ("sk-1=acme,rpm=5", "line 1: unknown or repeated option 'rpm'"),
        ("sk-1=acme,rate=0", "above 0"),
        ("sk-1=acme,tpm=0", "line 1: tpm must be a whole number of tokens per minute"),
        ("sk-1=acme,tpm=2.5", "line 1: tpm must be a whole number"),
        ("sk-1=acme,tpm=5\nsk-2=acme,tpm=6", "line 2: tenant 'acme' was given another tpm"),
        ("sk-1=acme,parallel=0", "line 1: parallel must be a whole number of requests under way at once"),
        ("sk-1=acme,budget=0", "line 1: budget must be above 0 USD a month"),
        ("sk-1=acme,parallel=4\nsk-2=acme,parallel=5", "line 2: tenant 'acme' was given another parallel"),
        ("sk-1=acme,models=a||b", "line 1: models=ID|ID once, with no empty id"),
        ("sk-1=acme,models=a,models=b", "line 1: models=ID|ID once"),
        ("sk-1=acme,models=a\nsk-2=acme,models=b", "line 2: tenant 'acme' was given other models"),
        ("# nothing\n", "no keys"),
    ],
)
def test_a_bad_keys_file_is_a_clear_error_that_does_not_echo_the_key(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as raised:
        ApiKeys.parse(text, source="keys.txt")
    assert "sk-1" not in str(raised.value)


def test_a_missing_keys_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the API keys file"):
        KeysFile(tmp_path / "absent.txt")


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer sk-1"}, "sk-1"),
        ({"authorization": "bearer  sk-1 "}, "sk-1"),
        ({"x-api-key": "sk-2"}, "sk-2"),
        ({"authorization": "Bearer sk-1", "x-api-key": "sk-2"}, "sk-1"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_the_key_comes_from_a_bearer_token_or_x_api_key(headers: dict[str, str], key: str | None) -> None:
    assert presented_key(headers) == key


def test_a_keys_file_is_read_again_when_it_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, now = tmp_path / "keys.txt", [0.0]
    path.write_text("sk-old=acme,rate=1\n")
    keys = KeysFile(path, interval=1.0, clock=lambda: now[0])
    rates = keys.rates  # what the rate limiter holds: a live view
    assert (keys.tenant("sk-old"), rates) == ("acme", {"acme": Rate(1.0, 1.0)})

    path.write_text("sk-new=globex,parallel=4\nsk-old2=acme,rate=5\n")
    # A key not known is looked up after a fresh read: one just added works on its first use.
    assert keys.tenant("sk-new") == "globex"
    assert (rates, keys.parallel_limits) == ({"acme": Rate(5.0, 5.0)}, {"globex": 4})
    path.write_text("sk-new=globex\n")
    # A known key is checked at most once a second: a removed one is refused within that.
    assert keys.tenant("sk-old2") == "acme"
    now[0] = 1.0
    assert keys.tenant("sk-old2") is None
    assert keys.tenant("sk-new") == "globex"

    # A file that no longer reads keeps the keys read before it, and says why once.
    path.write_text("sk-broken=not a tenant\n")
    now[0] = 2.0
    with caplog.at_level(logging.ERROR, logger="conveyor.gateway"):
        assert keys.tenant("sk-new") == "globex"
        assert keys.tenant("sk-someone") is None
    assert [r.getMessage() for r in caplog.records].count(
        f"API keys not reloaded, the keys read before stay: {path}, line 1: a tenant is 1-64 letters, "
        "digits, '_', '.' or '-'"
    ) == 1
    path.unlink()
    assert keys.tenant("sk-someone-else") is None
    assert keys.tenant("sk-new") == "globex"
    assert "cannot read the API keys file" in caplog.records[-1].getMessage()
