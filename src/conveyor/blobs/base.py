"""The BlobStore seam: immutable payloads by name, the claim-check of events too large for the log.

An event whose payload is over the log's size limit is written here first and published with a
reference to it (``log/claim_check.py``, DESIGN.md §4), so a long prompt or a large answer never
bloats the broker, and every backend of the log gets the same limit.
"""

from __future__ import annotations

from typing import Protocol


class BlobStore(Protocol):
    """Contract (tests/conformance/test_blob_store.py runs it against every backend):

    * ``put`` returns once the blob is durably stored; putting a name again replaces it (the
      claim-check only ever puts the same bytes again: a name is an event id).
    * ``get`` returns the bytes last put, or None for a name never put (or expired).
    * blobs expire on their own, no sooner than the store's ``max_age`` (the log's retention);
      a store that cannot expire them says how in its docstring.
    """

    async def put(self, name: str, data: bytes) -> None: ...

    async def get(self, name: str) -> bytes | None: ...

    async def ping(self) -> None:
        """Raise UnavailableError if the store cannot be reached."""
        ...

    async def close(self) -> None: ...
