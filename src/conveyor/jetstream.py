"""What the NATS event log and the NATS key-value store share: one connection, its health, and
the cheap request/reply path (``Replies``) their publishes and reads take.

A NATS URL names one server or several nodes of a cluster, and may say how many copies
JetStream keeps of each stream and bucket::

    nats://127.0.0.1:4222
    nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224?replicas=3
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, urlsplit

import nats
import orjson
from nats.aio.client import _HEADER_KEY_RE, Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.protocol.command import hpub_cmd

from conveyor.errors import UnavailableError
from conveyor.expiry import Expiry

logger = logging.getLogger(__name__)

# JetStream keeps at most five copies of a stream.
MAX_REPLICAS = 5


@dataclasses.dataclass(frozen=True, slots=True)
class NatsTarget:
    servers: tuple[str, ...]
    replicas: int = 1


def parse_url(url: str) -> NatsTarget:
    """The servers and the replica count a NATS URL names (``ValueError`` if it is malformed)."""
    base, _, query = url.partition("?")
    servers = tuple(s if "://" in s else f"nats://{s}" for s in (p.strip() for p in base.split(",")) if s)
    if not servers or any(urlsplit(s).scheme != "nats" or not urlsplit(s).hostname for s in servers):
        raise ValueError(f"malformed NATS URL {url!r}: use nats://HOST:PORT[,nats://HOST:PORT…][?replicas=N]")
    options = parse_qs(query, keep_blank_values=True)
    if unknown := set(options) - {"replicas"}:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} in NATS URL {url!r}")
    try:
        replicas = int(options.get("replicas", ["1"])[-1])
    except ValueError:
        replicas = 0
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be 1 to {MAX_REPLICAS} in NATS URL {url!r}")
    return NatsTarget(servers, replicas)


class _Client(Client):
    """nats-py's client with a cheaper header codec, the same bytes on the wire. Every event
    crosses NATS with ~9 headers, and nats-py checks each name with a regular expression and
    each value with ``translate`` on every publish (~20 µs here), and parses them a line at a
    time (~12 µs): more than the rest of the message costs (benchmarks/README.md). Here a name
    is checked once per process, values are checked for line breaks once per block, and a
    block is parsed in one decode; anything unusual takes nats-py's own path."""

    _names: ClassVar[dict[str, str]] = {}  # each header name checked, as it is written

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, str] | None
    ) -> None:
        block = self._header_block(headers) if headers and subject else None
        if block is None:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(hpub_cmd(subject, reply, block, payload))
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    @classmethod
    def _header_block(cls, headers: dict[str, str]) -> bytes | None:
        """``headers`` as NATS sends them, or None where nats-py must say what is wrong (a bad
        name, a line break in a value) or would change them (whitespace it strips)."""
        lines = ["NATS/1.0\r\n"]
        for key, value in headers.items():
            if (name := cls._names.get(key)) is None:
                name = key.strip()  # also a plain str of a str enum (nats-py's own header names)
                if name != key or not _HEADER_KEY_RE.fullmatch(name):
                    return None
                cls._names[name] = name
            text = value.strip()
            if text != value:
                return None
            lines.append(f"{name}: {text}\r\n")
        lines.append("\r\n")
        block = "".join(lines)
        if block.count("\n") != len(lines) or block.count("\r") != len(lines):
            return None
        return block.encode()

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return Client._parse_header_lines(raw)
        parsed = {}
        for line in text.split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                parsed[name.strip()] = value.strip()
        if any(not name or not name.isascii() or len(name.split()) != 1 for name in parsed):
            return Client._parse_header_lines(raw)
        return parsed


async def connect(servers: Sequence[str], *, name: str = "conveyor", timeout: float = 10.0) -> Client:
    """Connect to the first server of ``servers`` that answers within ``timeout``, then reconnect
    forever: a restarting server, or a cluster node that dies, must not kill the process."""

    nc = _Client()

    async def on_error(exc: Exception) -> None:  # one line per failed attempt, not a traceback
        logger.warning("nats (%s): %r", name, exc)

    async def on_reconnect() -> None:
        logger.warning("nats (%s): reconnected to %s", name, nc.connected_url)

    options: dict[str, Any] = {
        "servers": list(servers),
        "name": name,
        "connect_timeout": 2,
        "allow_reconnect": True,
        # Unbounded, so nats-py would also retry the first connect forever: ``timeout`` bounds it.
        "max_reconnect_attempts": -1,
        # Per server: with a cluster, the next node is tried at once.
        "reconnect_time_wait": 0.25,
        "error_cb": on_error,
        "reconnected_cb": on_reconnect,
    }
    try:
        async with asyncio.timeout(timeout):
            await nc.connect(**options)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        await _abandon(nc)
        raise UnavailableError(f"cannot reach NATS at {', '.join(servers)}: {exc!r}") from exc
    return nc


async def _abandon(nc: Client) -> None:
    try:
        await nc.close()
    except Exception:  # a half-open client may fail to close; it holds nothing worth reporting
        logger.debug("closing an unconnected NATS client failed", exc_info=True)


class PublishRefused(nats.errors.Error):
    """JetStream answered a publish with an error (e.g. 10071: not the expected last sequence)."""

    def __init__(self, err_code: int, description: str) -> None:
        super().__init__(f"{description} (err_code {err_code})")
        self.err_code, self.description = err_code, description


WRONG_LAST_SEQUENCE = 10071


class Replies:
    """Requests (JetStream publishes, direct gets) whose replies come to one wildcard inbox.

    ``request`` returns a future of the reply message. nats-py's ``publish_async`` and
    ``request`` start a task per call (``wait_for``) and parse each ack into a dataclass:
    ~60-70 µs of CPU per publish here, against ~30-40 (benchmarks/README.md). A reply lost
    with a dropped connection never comes: a request not answered within ``timeout`` fails
    with TimeoutError (a little later, up to a quarter more). One sweep finds them all:
    a timer per call (``asyncio.timeout``, a libuv timer each under uvloop) cost more CPU
    than the request itself.
    """

    def __init__(self, nc: Client, timeout: float) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._pending: dict[str, asyncio.Future[Msg]] = {}
        self._unanswered: Expiry[str] = Expiry(timeout, self._expire)
        self._sent = 0
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()

    async def request(
        self, subject: str, data: bytes = b"", headers: dict[str, str] | None = None
    ) -> asyncio.Future[Msg]:
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._sent += 1
        token = str(self._sent)
        reply: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._pending[token] = reply
        self._unanswered.add(token)
        reply.add_done_callback(functools.partial(self._forget, token))  # answered, timed out or cancelled
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            reply.cancel()
            raise
        return reply

    def _forget(self, token: str, _: object) -> None:
        self._pending.pop(token, None)
        self._unanswered.discard(token)

    def _expire(self, token: str) -> None:
        reply = self._pending.get(token)
        if reply is not None and not reply.done():
            reply.set_exception(TimeoutError(f"no reply from NATS within {self._unanswered.seconds} s"))

    async def close(self) -> None:
        await self._unanswered.close()

    async def _on_reply(self, msg: Msg) -> None:
        reply = self._pending.get(msg.subject[len(self._prefix) :])
        if reply is None or reply.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            reply.set_exception(nats.errors.NoRespondersError())
        else:
            reply.set_result(msg)


Request = tuple[str, bytes, dict[str, str] | None]  # subject, body, headers


def stored(ack: Msg) -> int:
    """The stream sequence a JetStream publish acknowledgement reports; raises PublishRefused."""
    try:
        reply = orjson.loads(ack.data)
        error = reply.get("error")
        if error is None:
            return int(reply["seq"])
        err_code, description = int(error.get("err_code", 0)), str(error.get("description"))
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise nats.errors.Error(f"malformed publish acknowledgement {ack.data[:200]!r}") from None
    raise PublishRefused(err_code, description)


class JetStreamBackend:
    """Base of the NATS adapters: owns the connection, answers ``ping`` and ``close``.

    ``replicas`` is how many cluster nodes keep a copy of each stream or bucket this
    backend creates (1 on a single server; 3 survives the loss of any one node of three).
    """

    client_name: ClassVar[str] = "conveyor"
    # How long a request (or a publish) waits for its reply. nats-py never fails one whose
    # connection dropped: it waits this long, so keep it short (replies take milliseconds).
    timeout: ClassVar[float] = 3.0

    def __init__(self, nc: Client, *, replicas: int = 1) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=self.timeout)
        self._replies = Replies(nc, self.timeout)
        self.replicas = replicas

    @classmethod
    async def open(cls, url: str, **options: Any) -> Self:
        """Connect to the server(s) of ``url``; its ``?replicas=N`` unless ``replicas`` is given."""
        target = parse_url(url)
        options.setdefault("replicas", target.replicas)
        return cls(await connect(target.servers, name=cls.client_name), **options)

    async def _heard(self, requests: Sequence[Request]) -> list[Msg]:
        """The replies to ``requests``, each from the stream that took it. All are in flight at
        once, sent in order. Those no stream answered were not stored (a stream or bucket just
        created on a cluster, or electing a leader, answers within moments): they are sent again,
        for up to ``timeout``."""
        give_up = time.monotonic() + self.timeout
        replies: list[Msg | None] = [None] * len(requests)
        unheard = list(range(len(requests)))
        while True:
            unheard = await self._send(requests, unheard, replies)
            if not unheard:
                return [reply for reply in replies if reply is not None]
            if time.monotonic() > give_up:
                raise TimeoutError(f"no stream answered {len(unheard)} request(s) within {self.timeout} s")
            await asyncio.sleep(0.05)

    async def _send(
        self, requests: Sequence[Request], which: list[int], replies: list[Msg | None]
    ) -> list[int]:
        """Send ``requests[i]`` for each i of ``which`` and put their replies in ``replies``; the
        ones no stream answered."""
        pending = []
        try:
            for i in which:
                pending.append(await self._replies.request(*requests[i]))
            unheard = []
            for i, reply in zip(which, pending, strict=False):  # all in flight: waiting in order is free
                try:
                    replies[i] = await reply
                except nats.errors.NoRespondersError:
                    unheard.append(i)
            return unheard
        finally:
            for reply in pending:  # on failure, settle the rest so none is left unobserved
                if not reply.done():
                    reply.cancel()
                elif not reply.cancelled():
                    reply.exception()  # marks a failure as seen

    async def _direct_get(self, subject: str, body: bytes = b"", *, what: str) -> Msg | None:
        """A stream's message by a direct get (``subject``: ``$JS.API.DIRECT.GET.<stream>...``; the
        stream allows direct reads): one request, answered by any replica, without a consumer.
        None if there is no such message; UnavailableError, saying ``what`` was read, on failure."""
        try:
            (reply,) = await self._heard([(subject, body, None)])
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"{what}: {exc!r}") from exc
        headers = reply.headers or {}
        if status := headers.get("Status"):
            if status == "404":
                return None
            raise UnavailableError(f"{what}: {status} {headers.get('Description', '')}")
        return reply

    async def ping(self) -> None:
        try:
            await self._js.account_info()
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"JetStream unavailable: {exc!r}") from exc

    async def close(self) -> None:
        await self._replies.close()
        if not self._nc.is_closed:
            await self._nc.close()
