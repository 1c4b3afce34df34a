"""The database schema, applied from the service image's own migration files.

The image carries goose-format SQL files; the metadata service expects goose's
bookkeeping table to say which of them were applied. We apply them ourselves
with psycopg (no migration container): in version order, only the `Up` part,
one transaction per file unless the file says `NO TRANSACTION`, recording each
version as goose would. Running it again applies only what is missing, and an
interrupted run picks up where it stopped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import errors as pg_errors

from .errors import StackError

MIGRATIONS_IN_IMAGE = "root/services/migration_service/migration_files"
VERSION_TABLE = "goose_db_version"

_FILE_NAME = re.compile(r"^(\d+)_[^/]*\.sql$")
_INDEX_NAME = re.compile(r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?\"?(\w+)\"?",
                         re.IGNORECASE)


class SchemaError(StackError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    path: Path
    statements: tuple[str, ...]
    in_transaction: bool


@dataclass(frozen=True)
class SchemaReport:
    applied: tuple[int, ...]
    version: int
    newest_available: int


def parse_migration(path: Path) -> Migration:
    """Read one goose file: its version, the statements of its Up part, its transaction mode."""
    match = _FILE_NAME.match(path.name)
    if not match:
        raise SchemaError(f"not a migration file name (<version>_<name>.sql): {path.name}")
    statements: list[str] = []
    in_transaction = True
    in_up = in_block = False
    buffer: list[str] = []
    for line in path.read_text().splitlines():
        marker = line.strip()
        if marker.startswith("-- +goose"):
            directive = marker[len("-- +goose"):].strip().upper()
            if directive == "UP":
                in_up = True
            elif directive == "DOWN":
                break
            elif directive == "NO TRANSACTION":
                in_transaction = False
            elif directive == "STATEMENTBEGIN" and in_up:
                in_block = True
            elif directive == "STATEMENTEND" and in_up:
                in_block = False
                _flush(buffer, statements)
            continue
        if not in_up:
            continue
        buffer.append(line)
        if not in_block and marker.endswith(";"):
            _flush(buffer, statements)
    if in_block:
        raise SchemaError(f"{path.name}: StatementBegin without StatementEnd")
    _flush(buffer, statements)
    return Migration(int(match.group(1)), path, tuple(statements), in_transaction)


def _flush(buffer: list[str], statements: list[str]) -> None:
    text = "\n".join(buffer).strip()
    buffer.clear()
    if text and any(line.strip() and not line.strip().startswith("--") for line in text.splitlines()):
        statements.append(text)


def available_migrations(folder: Path) -> list[Migration]:
    if not folder.is_dir():
        raise SchemaError(f"the service image has no migration files at /{MIGRATIONS_IN_IMAGE}",
                          hint="check that MF_SERVICE_IMAGE names a Metaflow metadata service image")
    migrations = sorted((parse_migration(path) for path in folder.glob("*.sql")), key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"two migration files share a version in {folder}")
    return migrations


def current_version(conn: psycopg.Connection) -> int | None:
    """The newest applied version, as goose reads it; None when no bookkeeping exists."""
    exists = conn.execute("SELECT to_regclass(%s)", (VERSION_TABLE,)).fetchone()
    if not exists or exists[0] is None:
        return None
    row = conn.execute(f"SELECT version_id FROM {VERSION_TABLE} WHERE is_applied "
                       "ORDER BY id DESC LIMIT 1").fetchone()
    return None if row is None else int(row[0])


def apply(dsn: str, folder: Path, progress: Callable[[str], None] = lambda _: None) -> SchemaReport:
    """Bring the database up to the newest migration the image carries, and no further."""
    migrations = available_migrations(folder)
    newest = migrations[-1].version if migrations else 0
    try:
        conn = psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise SchemaError(f"cannot connect to PostgreSQL to apply the schema: {exc}") from exc
    applied: list[int] = []
    with conn:
        _ensure_version_table(conn)
        version = current_version(conn) or 0
        if version > newest:
            raise SchemaError(
                f"the database is at schema version {version}, newer than this service image knows ({newest})",
                hint="use the service image that created this database (MF_SERVICE_IMAGE) or a newer one")
        done = {int(row[0]) for row in conn.execute(f"SELECT version_id FROM {VERSION_TABLE} WHERE is_applied")}
        for migration in migrations:
            if migration.version in done or migration.version <= version:
                continue
            progress(f"applying {migration.path.name}")
            _apply_one(conn, migration)
            applied.append(migration.version)
        version = current_version(conn) or 0
    return SchemaReport(tuple(applied), version, newest)


def _ensure_version_table(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (VERSION_TABLE,))
        if current_version(conn) is not None:
            return
        conn.execute(f"""CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
                           id serial PRIMARY KEY,
                           version_id bigint NOT NULL,
                           is_applied boolean NOT NULL,
                           tstamp timestamp NULL DEFAULT now())""")
        if conn.execute(f"SELECT count(*) FROM {VERSION_TABLE}").fetchone()[0] == 0:
            conn.execute(f"INSERT INTO {VERSION_TABLE} (version_id, is_applied) VALUES (0, true)")


def _record(conn: psycopg.Connection, version: int) -> None:
    conn.execute(f"INSERT INTO {VERSION_TABLE} (version_id, is_applied) VALUES (%s, true)", (version,))


def _apply_one(conn: psycopg.Connection, migration: Migration) -> None:
    try:
        if migration.in_transaction:
            with conn.transaction():
                for statement in migration.statements:
                    conn.execute(statement)
                _record(conn, migration.version)
            return
        # Statements such as CREATE INDEX CONCURRENTLY must run alone, outside a transaction.
        for statement in migration.statements:
            _run_resumable(conn, statement)
        _record(conn, migration.version)
    except psycopg.Error as exc:
        raise SchemaError(f"migration {migration.path.name} failed: {exc.diag.message_primary or exc}",
                          hint="the database was left at the last fully applied version; "
                               "fix the cause and run `up` again to resume") from exc


def _run_resumable(conn: psycopg.Connection, statement: str) -> None:
    """Run one autocommit statement; after an interrupted run, tolerate what it already built."""
    index = _INDEX_NAME.search(statement)
    try:
        conn.execute(statement)
    except (pg_errors.DuplicateTable, pg_errors.DuplicateObject, pg_errors.DuplicateColumn):
        if not index:
            return
    if index and not _index_valid(conn, index.group(1)):
        # An interrupted CREATE INDEX CONCURRENTLY leaves an invalid index that
        # IF NOT EXISTS would keep for good: drop it and build it again.
        conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{index.group(1)}"')
        conn.execute(statement)


def _index_valid(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                       "WHERE c.relname = %s", (name,)).fetchone()
    return row is None or bool(row[0])
