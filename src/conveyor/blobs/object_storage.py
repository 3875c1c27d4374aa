"""BlobStore on object storage through obstore: S3 and S3-compatible servers, GCS, Azure, a directory.

``s3://bucket/prefix`` (credentials, region and endpoint from the usual ``AWS_*`` variables, or as
query parameters: ``?endpoint=http://127.0.0.1:9000&region=us-east-1``), ``gs://bucket/prefix``,
``az://account/container/prefix``, or ``file:///absolute/directory`` for one machine.

Cloud buckets expire blobs by a lifecycle rule of the bucket (delete objects under the prefix
after the log's retention, 7 days by default): a process here cannot set one, nor should every
worker list a whole bucket to find what is old. A directory is swept by each process that writes
to it, when it first writes and then daily.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from conveyor.errors import UnavailableError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

logger = logging.getLogger(__name__)
_WEEK = 7 * 86_400.0
# obstore retries a failed request for up to 3 minutes by default; a stage waiting on a blob holds
# its event that long. Fail sooner: the event is handed back to the broker and comes again.
_RETRY: RetryConfig = {"max_retries": 3, "retry_timeout": datetime.timedelta(seconds=10)}


class ObjectStorageBlobs:
    def __init__(self, url: str, *, max_age: float = _WEEK) -> None:
        try:
            import obstore
            from obstore.store import from_url
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError("object storage needs obstore: pip install 'conveyor[blobs]'") from exc
        self._obstore = obstore
        parts = urlsplit(url)
        options: dict[str, Any] = dict(parse_qsl(parts.query))
        client: ClientConfig = {"connect_timeout": datetime.timedelta(seconds=5)}
        if options.get("endpoint", "").startswith("http://"):
            client["allow_http"] = True  # an S3-compatible server on a private network, or loopback
        if parts.scheme == "file":
            options["mkdir"] = True
        try:
            location = parts._replace(query="").geturl()
            self._store = from_url(location, client_options=client, retry_config=_RETRY, **options)
        except (ValueError, self._obstore.exceptions.BaseError) as exc:
            raise ValueError(f"blob store {url!r}: {exc}") from exc
        self._max_age = max_age
        self._sweeps = parts.scheme == "file"
        self._next_sweep = 0.0
        self._sweeping: asyncio.Task[None] | None = None

    async def put(self, name: str, data: bytes) -> None:
        try:
            await self._obstore.put_async(self._store, name, data)
        except (OSError, self._obstore.exceptions.BaseError) as exc:
            raise UnavailableError(f"blob put {name}: {exc}") from exc
        if self._sweeps and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + 86_400.0
            self._sweeping = asyncio.create_task(self._sweep_in_background())

    async def get(self, name: str) -> bytes | None:
        try:
            result = await self._obstore.get_async(self._store, name)
            return bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        except (OSError, self._obstore.exceptions.BaseError) as exc:
            raise UnavailableError(f"blob get {name}: {exc}") from exc

    async def sweep(self) -> int:
        """Delete the blobs older than ``max_age``; how many went."""
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=self._max_age)
        old = [
            meta["path"]
            async for batch in self._obstore.list(self._store)
            for meta in batch
            if meta["last_modified"] < cutoff
        ]
        for start in range(0, len(old), 1000):
            await self._obstore.delete_async(self._store, old[start : start + 1000])
        return len(old)

    async def _sweep_in_background(self) -> None:
        try:
            await self.sweep()
        except (OSError, self._obstore.exceptions.BaseError) as exc:  # tried again in a day
            logger.warning("blobs older than %.0f s not swept: %s", self._max_age, exc)

    async def ping(self) -> None:
        try:
            await self._obstore.head_async(self._store, ".ping")
        except FileNotFoundError:
            return  # reached, and it answered
        except (OSError, self._obstore.exceptions.BaseError) as exc:
            raise UnavailableError(f"blob store unavailable: {exc}") from exc

    async def close(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
