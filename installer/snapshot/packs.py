"""The pack store: chunks of data files, compressed, appended to pack files and found by sha256.

Each chunk is stored once; a generation's manifest carries the chunk index (pack, offset, length,
sha256 of the stored bytes). Readers check the stored bytes before decompressing them and the data
after: zlib ignores some bits of its input, so a damaged byte could otherwise decompress unnoticed.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .destination import remove_path


CHUNK_SIZE = 1024 * 1024


PACK_SIZE = 64 * 1024 * 1024


class Corrupt(Exception):
    """A generation that cannot be used; the message says why."""


class PackWriter:
    """Chunks of one snapshot appended to its pack files; chunks already stored are reused."""

    def __init__(self, dest: Path, pack_prefix: str = "") -> None:
        self.dest = dest
        self.packs = dest / "packs"
        self.tmp = dest / "tmp"
        self.generations = dest / "generations"
        self.index: dict[str, list[Any]] = {}     # digest -> [pack, offset, length, sha256 of the stored bytes]
        self.used: dict[str, list[Any]] = {}      # the part of the index this snapshot references
        self.prefix = pack_prefix or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.handle: Any = None
        self.pack_name = ""
        self.pack_count = 0
        self.uploaded = 0
        self.new_chunks = 0

    def prepare(self, manifests: Iterable[dict[str, Any]]) -> None:
        """Create the folders, empty tmp/, and learn the chunks the good `manifests` already stored."""
        for folder in (self.packs, self.tmp, self.generations):
            folder.mkdir(exist_ok=True)
        self.clear_tmp()
        for manifest in manifests:
            # Chunks stored without a checksum of their stored bytes are stored again, checked.
            self.index.update((digest, location) for digest, location in chunk_index(manifest).items()
                              if len(location) == 4 and location[0] is not None)

    def clear_tmp(self) -> None:
        if self.tmp.is_dir():
            for entry in os.listdir(self.tmp):
                remove_path(self.tmp / entry)

    def has(self, digest: str) -> bool:
        if digest in self.index:
            self.used[digest] = self.index[digest]
            return True
        return False

    def put(self, raw: bytes) -> str:
        digest = hashlib.sha256(raw).hexdigest()
        if self.has(digest):
            return digest
        data = zlib.compress(raw, 1)
        if self.handle is None or self.handle.tell() + len(data) > PACK_SIZE:
            self.close_pack()
            self.pack_count += 1
            self.pack_name = f"{self.prefix}-{self.pack_count}.pack"
            self.handle = open(self.packs / self.pack_name, "xb")
        offset = self.handle.tell()
        self.handle.write(data)
        self.index[digest] = self.used[digest] = [self.pack_name, offset, len(data), hashlib.sha256(data).hexdigest()]
        self.uploaded += len(data)
        self.new_chunks += 1
        return digest

    def close_pack(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            try:
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                handle.close()


def chunk_index(manifest: dict[str, Any]) -> dict[str, list[Any]]:
    if manifest.get("format") == 1:
        return {digest: [None, 0, 0] for entry in manifest["files"] for digest in entry["chunks"]}
    return manifest["chunk_index"]


class ChunkReader:
    """Reads chunks for a restore, keeping each pack open once."""

    def __init__(self, dest: Path, index: dict[str, list[Any]]) -> None:
        self.dest = dest
        self.index = index
        self.handles: dict[str, Any] = {}

    def read(self, digest: str) -> bytes:
        pack, offset, length, *stored = self.index.get(digest, [None, 0, 0])
        if pack is None:
            return _read_blob(self.dest, digest)
        try:
            handle = self.handles.get(pack)
            if handle is None:
                handle = self.handles[pack] = open(self.dest / "packs" / pack, "rb")
            handle.seek(offset)
            data = handle.read(length)
        except FileNotFoundError:
            raise Corrupt(f"pack {pack} is missing") from None
        except OSError as exc:
            raise Corrupt(f"pack {pack} cannot be read: {exc.strerror}") from None
        what = f"chunk {digest[:12]} at byte {offset} of pack {pack}"
        if len(data) != length:
            raise Corrupt(f"{what} is truncated or damaged (only {len(data)} of {length} bytes)")
        if stored and hashlib.sha256(data).hexdigest() != stored[0]:
            raise Corrupt(f"{what} is damaged (its stored bytes do not match their checksum)")
        return _check_chunk(data, digest, what)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def _check_chunk(data: bytes, digest: str, what: str) -> bytes:
    try:
        raw = zlib.decompress(data)
    except zlib.error:
        raise Corrupt(f"{what} is truncated or damaged") from None
    if hashlib.sha256(raw).hexdigest() != digest:
        raise Corrupt(f"{what} does not match its checksum")
    return raw


def _read_blob(dest: Path, digest: str) -> bytes:
    path = dest / "blobs" / digest[:2] / digest
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Corrupt(f"chunk {digest[:12]} is missing") from None
    except OSError as exc:
        raise Corrupt(f"chunk {digest[:12]} cannot be read: {exc.strerror}") from None
    return _check_chunk(data, digest, f"chunk {digest[:12]}")
