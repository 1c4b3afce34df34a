"""Published generations: reading and checking manifests, what is newest, and pruning."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from .destination import fsync_dir, remove_path
from .packs import ChunkReader, Corrupt, chunk_index
from .pg import connect
from .wal import read_piece


# 1: one file per chunk under blobs/; 2: packs, without checksums of the stored bytes (both read, never written)
READABLE_FORMATS = (1, 2, 3)


DEFAULT_KEEP = 5


@dataclass(frozen=True)
class GenerationInfo:
    """A published generation as found on the destination; `ok` False says why in `reason`."""
    id: str
    path: Path
    ok: bool
    reason: str | None
    created: float | None = None
    size: int | None = None
    start_lsn: str | None = None
    stop_lsn: str | None = None
    pg_version: str | None = None
    system_identifier: str | None = None
    xact_snapshot: str | None = None
    manifest: dict[str, Any] | None = field(default=None, repr=False, compare=False)


def manifest_checksum(body: dict[str, Any]) -> str:
    content = {key: value for key, value in body.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise Corrupt(f"manifest cannot be read: {exc.strerror}") from None
    except ValueError:
        raise Corrupt("manifest is truncated or damaged (not valid JSON)") from None
    if not isinstance(manifest, dict):
        raise Corrupt("manifest is damaged (not a JSON object)")
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise Corrupt("manifest is damaged (it does not match its checksum)")
    if manifest.get("format") not in READABLE_FORMATS:
        raise Corrupt(f"manifest has format {manifest.get('format')!r}, which this version cannot read "
                       f"(it reads {', '.join(map(str, READABLE_FORMATS))}): upgrade the installer")
    return manifest


def _info(path: Path, manifest: dict[str, Any] | None, reason: str | None) -> GenerationInfo:
    m = manifest or {}
    return GenerationInfo(id=path.stem, path=path, ok=reason is None, reason=reason, created=m.get("created"),
                          size=m.get("size"), start_lsn=m.get("start_lsn"), stop_lsn=m.get("stop_lsn"),
                          pg_version=m.get("pg_version"), system_identifier=m.get("system_identifier"),
                          xact_snapshot=m.get("xact_snapshot"), manifest=manifest)


def list_generations(dest: Path | str, *, deep: bool = False) -> list[GenerationInfo]:
    """Published generations, newest first. Each is checked: its manifest against its checksum and
    every chunk it needs for presence; with `deep`, every chunk is also read and verified."""
    folder = Path(dest) / "generations"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json"), reverse=True):
        manifest = None
        try:
            manifest = _load_manifest(path)
            _check_complete(Path(dest), manifest, deep)
        except Corrupt as exc:
            found.append(_info(path, manifest, str(exc)))
            continue
        found.append(_info(path, manifest, None))
    return found


def _check_complete(dest: Path, manifest: dict[str, Any], deep: bool) -> None:
    """Raise Corrupt unless every file the manifest needs is there in full (Drive may deliver a
    manifest before its packs, or a pack's name before its content); `deep` reads every chunk."""
    index = chunk_index(manifest)
    if deep:
        reader = ChunkReader(dest, index)
        try:
            for entry in manifest["files"]:
                for digest in entry["chunks"]:
                    reader.read(digest)
        finally:
            reader.close()
        return
    extents: dict[str, int] = {}
    for entry in manifest["files"]:
        for digest in entry["chunks"]:
            location = index.get(digest)
            if location is None:
                raise Corrupt(f"chunk {digest[:12]} of {entry['path']} is not in the chunk index")
            pack, offset, length = location[:3]
            if pack is None:
                if not (dest / "blobs" / digest[:2] / digest).is_file():
                    raise Corrupt(f"chunk {digest[:12]} of {entry['path']} is missing")
            else:
                extents[pack] = max(extents.get(pack, 0), offset + length)
    for pack, needed in sorted(extents.items()):
        try:
            size = (dest / "packs" / pack).stat().st_size
        except FileNotFoundError:
            raise Corrupt(f"pack {pack} is missing (not uploaded yet?)") from None
        if size < needed:
            raise Corrupt(f"pack {pack} is incomplete ({size} of {needed} bytes arrived)")


def database_state(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """(pg_current_snapshot(), system identifier): the first changes only when a writing transaction ends."""
    row = conn.execute("SELECT pg_current_snapshot()::text,"
                       " (SELECT system_identifier FROM pg_control_system())::text").fetchone()
    assert row is not None
    return row[0], row[1]


def newest_baseline(dest: Path | str, system_id: str) -> str | None:
    """The database state the newest good generation of this cluster and its last WAL piece cover."""
    try:
        newest = next((info for info in list_generations(dest) if info.ok), None)
    except OSError:
        return None
    if newest is None or newest.system_identifier != system_id:
        return None
    folder = Path(dest) / "wal" / newest.id
    try:
        pieces = sorted(name for name in os.listdir(folder) if name.endswith(".wal"))
    except OSError:
        pieces = []
    if pieces:
        try:
            return read_piece(folder / pieces[-1])[0]["xact_snapshot"]
        except Corrupt:
            pass
    return newest.xact_snapshot


def unchanged_since_last(dsn: str, dest: Path | str) -> bool:
    """True when the newest good generation already holds everything the database has committed."""
    with connect(dsn) as conn:
        current, system_id = database_state(conn)
    return newest_baseline(dest, system_id) == current


def prune(dest: Path, keep: int) -> list[str]:
    """Drop generations older than the newest `keep` good ones, then chunks nothing references."""
    good = 0
    pruned = []
    for info in list_generations(dest):
        if good >= keep:
            info.path.unlink(missing_ok=True)
            pruned.append(info.id)
        elif info.ok:
            good += 1
    if pruned:
        fsync_dir(dest / "generations")
    collect_garbage(dest)
    return pruned


def collect_garbage(dest: Path) -> None:
    """Delete chunks no published manifest references. Caller holds the lock."""
    referenced: set[str] = set()
    packs: set[str] = set()
    generations: set[str] = set()
    for path in (dest / "generations").glob("*.json"):
        generations.add(path.stem)
        try:
            manifest = json.loads(path.read_bytes())
        except OSError:
            return  # a manifest we cannot read may still need its chunks: delete nothing
        except ValueError:
            continue  # truncated: unusable anyway
        if not isinstance(manifest, dict):
            continue
        for entry in manifest.get("files", []):
            referenced.update(entry.get("chunks", []))
        packs.update(location[0] for location in manifest.get("chunk_index", {}).values())
    if (dest / "packs").is_dir():
        for name in os.listdir(dest / "packs"):
            if name not in packs:
                (dest / "packs" / name).unlink(missing_ok=True)
    if (dest / "wal").is_dir():
        for name in os.listdir(dest / "wal"):
            if name not in generations:
                remove_path(dest / "wal" / name)
    blobs = dest / "blobs"
    if not blobs.is_dir():
        return
    for prefix in os.listdir(blobs):
        for name in os.listdir(blobs / prefix):
            if name not in referenced:
                (blobs / prefix / name).unlink(missing_ok=True)
