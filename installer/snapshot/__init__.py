"""Crash-consistent snapshots of PostgreSQL's data folder, published to a folder (Google Drive) and restored.

Why PostgreSQL's low-level backup API and not WAL archiving: a snapshot taken between
`pg_backup_start` and `pg_backup_stop` in one session, together with the WAL written in
between and the returned backup_label, is what PostgreSQL itself promises to recover
into a consistent state, whatever the copied files looked like mid-write. Each
generation is self-contained (restore needs no restore_command, no archive chain and no
server setting beyond the defaults), while archiving would need `archive_mode` fixed at
server start and would ship a 16 MB segment per switch with its own loss window.

A snapshot, in one database session:
  1. a temporary physical replication slot pins the WAL from now on, so no segment the
     copy needs is recycled, whatever `wal_keep_size` is (the slot dies with the session);
  2. `pg_backup_start(label, fast => true)` gives the start LSN (a fresh checkpoint);
  3. every data file is read in 1 MiB chunks; a chunk is stored once, compressed, appended to
     this snapshot's pack file(s), and found by its sha256 through the manifests' chunk index,
     so an unchanged chunk is never uploaded again; the index also holds the sha256 of the
     compressed bytes as stored (zlib ignores some bits of its input, so a damaged byte can
     still decompress to the right data: the stored bytes are checked before they are used);
  4. `pg_backup_stop(wait_for_archive => false)` gives the stop LSN and backup_label;
  5. the WAL segments from start to stop go into the generation like data files;
  6. the manifest is written under tmp/, fsynced, read back and renamed into generations/.

Between generations the watcher ships the WAL itself (`ship_wal`): every second or so under
writes, the WAL flushed since the last piece goes into one small file, so a commit is on the
destination within about a second instead of a snapshot's worth of seconds. Restore replays
the generation and then the unbroken run of its WAL pieces.

Layout of the destination (only published manifests are trusted by restore):
  generations/<id>.json   manifest: files with sizes, sha256 and chunk list, chunk index, LSNs, and
                          its own sha256
  packs/<id>-<n>.pack     zlib-compressed chunks, back to back (up to 64 MiB per pack)
  wal/<id>/<lsn>.wal      WAL pieces shipped after generation <id>: a JSON header line, then zlib
  tmp/                    partial writes; emptied under the lock before and after each snapshot

Google Drive costs a round trip per file operation and uploads asynchronously, in any order:
so few, large files (packs rather than one file per chunk), small folders, and a restore that
checks every file a generation needs (sizes, then checksums) before trusting it. The lock
that serialises writers is a local file (Drive is no place for locks).

Modules, one concern each:
  destination   the snapshot folder: checks, the local lock, durable writes
  packs         chunks in pack files: writing, reading, checking
  pg            connections and WAL positions
  backup        taking a snapshot (the steps above) and publishing its manifest
  generations   listing and checking published generations, pruning
  wal           shipping WAL pieces between generations, and applying them at restore
  restore       restoring the newest generation that verifies
  sequences     moving id sequences past what a lost window handed out
  status        the watcher's status file
"""

from .backup import REQUIRED_SETTINGS, Generation, SnapshotCache, generation_id_at, take_snapshot
from .destination import check_destination, lock_path
from .generations import (DEFAULT_KEEP, GenerationInfo, database_state, list_generations, newest_baseline,
                          unchanged_since_last)
from .pg import wal_segments
from .restore import RestoreReport, restore
from .sequences import RestoredPoint, advance_sequences, clear_marker, read_marker, sequences_marker
from .status import SnapshotStatus, read_status, write_status
from .wal import WalChain, chain_after, ship_wal

__all__ = [
    "DEFAULT_KEEP", "REQUIRED_SETTINGS", "Generation", "GenerationInfo", "RestoreReport", "RestoredPoint",
    "SnapshotCache", "clear_marker", "read_marker",
    "SnapshotStatus", "WalChain", "advance_sequences", "chain_after", "check_destination", "database_state",
    "generation_id_at", "list_generations", "lock_path", "newest_baseline", "read_status", "restore",
    "sequences_marker", "ship_wal", "take_snapshot", "unchanged_since_last", "wal_segments", "write_status",
]
