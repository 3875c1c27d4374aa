"""Files clients upload (a batch's input) or the gateway writes (a batch's results), in the state store.

A file is its record (``<id>``: tenant, name, purpose, size) and its content in pieces of
``PIECE`` bytes (``<id>.<n>``), so no value outgrows what a store takes in one write (NATS: 1 MB).
The pieces are written before the record: a file that is listed is whole.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from pydantic import BaseModel

from conveyor.store.base import Namespace, StateStore

PIECE = 256 * 1024


class StoredFile(BaseModel):
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    pieces: int

    def public(self) -> dict[str, Any]:
        """As OpenAI's Files API describes a file."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
        }


class Files:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def save(
        self, tenant: str, filename: str, purpose: str, content: bytes, *, file_id: str | None = None
    ) -> StoredFile:
        """Store ``content``; with ``file_id``, only once (a second save of that id returns the first)."""
        fid = file_id or f"file-{uuid.uuid4().hex}"
        if file_id is not None and (existing := await self.get(file_id)) is not None:
            return existing
        pieces = [content[i : i + PIECE] for i in range(0, len(content), PIECE)]
        await asyncio.gather(
            *(self._store.put(Namespace.FILES, f"{fid}.{n}", piece) for n, piece in enumerate(pieces))
        )
        stored = StoredFile(
            id=fid,
            tenant=tenant,
            filename=filename,
            purpose=purpose,
            bytes=len(content),
            created_at=int(time.time()),
            pieces=len(pieces),
        )
        if await self._store.create(Namespace.FILES, fid, stored.model_dump_json().encode()) is None:
            return await self.get(fid) or stored  # saved at the same time by another caller
        return stored

    async def get(self, file_id: str, tenant: str | None = None) -> StoredFile | None:
        """The file's record (None if there is none, or it is another tenant's)."""
        if not _valid(file_id):
            return None
        entry = await self._store.get(Namespace.FILES, file_id)
        stored = StoredFile.model_validate_json(entry.value) if entry else None
        return stored if stored is not None and tenant in (None, stored.tenant) else None

    async def content(self, stored: StoredFile) -> bytes:
        entries = await asyncio.gather(
            *(self._store.get(Namespace.FILES, f"{stored.id}.{n}") for n in range(stored.pieces))
        )
        if any(entry is None for entry in entries):
            raise LookupError(f"file {stored.id} lost a piece of its content (expired?)")
        return b"".join(entry.value for entry in entries if entry is not None)

    async def listed(self, tenant: str) -> list[StoredFile]:
        """The tenant's files, newest first."""
        keys = [key for key in await self._store.keys(Namespace.FILES) if "." not in key]
        found = await asyncio.gather(*(self.get(key, tenant) for key in keys))
        return sorted((f for f in found if f is not None), key=lambda f: (-f.created_at, f.id))

    async def delete(self, stored: StoredFile) -> None:
        await self._store.delete(Namespace.FILES, stored.id)  # first: a listed file is whole
        await asyncio.gather(
            *(self._store.delete(Namespace.FILES, f"{stored.id}.{n}") for n in range(stored.pieces))
        )


def _valid(file_id: str) -> bool:
    return file_id.startswith("file-") and file_id[5:].replace("-", "").isalnum()


def dumps(lines: list[dict[str, Any]]) -> bytes:
    """JSON Lines."""
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)
