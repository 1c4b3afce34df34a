"""The schema is applied from goose-format files with goose's own bookkeeping, on a real PostgreSQL 15."""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from installer import schema

from .conftest import upstream_archive
from .helpers_pg import PgCluster, make_workdir

# The migration files of metaflow-service v2.5.1, as its image carries them.
UPSTREAM_VERSIONS = (1, 20200603104139, 20201002000616, 20210202145952, 20210260056859, 20211202100726,
                     20220503175500, 20230118020300)


@pytest.fixture(scope="module")
def image_migrations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The upstream migration files, unpacked from the verified release archive the image is built from."""
    target = tmp_path_factory.mktemp("upstream-migrations")
    prefix = "metaflow-service-2.5.1/services/migration_service/migration_files/"
    with tarfile.open(upstream_archive()) as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.startswith(prefix) and member.name.endswith(".sql"):
                handle = archive.extractfile(member)
                assert handle is not None
                (target / Path(member.name).name).write_bytes(handle.read())
    return target


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    work = make_workdir("mf-schema-")
    server = PgCluster.initdb(work / "data")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def database(cluster: PgCluster, request: pytest.FixtureRequest) -> str:
    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "")[:50]
    with cluster.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return cluster.dsn.replace("dbname=postgres", f"dbname={name}")


def _rows(dsn: str) -> list[tuple[int, bool]]:
    with psycopg.connect(dsn) as conn:
        return [(int(v), a) for v, a in conn.execute(
            "SELECT version_id, is_applied FROM goose_db_version ORDER BY id")]


def _write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)


def test_parse_blocks_and_transaction_mode(tmp_path: Path) -> None:
    _write(tmp_path, "7_things.sql", """-- +goose Up
CREATE TABLE a (id int);
-- +goose StatementBegin
CREATE FUNCTION f() RETURNS int AS $$
BEGIN
  RETURN 1;
END;
$$ LANGUAGE plpgsql;
-- +goose StatementEnd
INSERT INTO a VALUES (1);

-- +goose Down
DROP TABLE a;
""")
    _write(tmp_path, "8_index.sql", "-- +goose NO TRANSACTION\n-- +goose Up\nCREATE INDEX CONCURRENTLY i ON a (id);\n")
    first = schema.parse_migration(tmp_path / "7_things.sql")
    assert first.version == 7 and first.in_transaction
    assert len(first.statements) == 3
    assert first.statements[1].startswith("CREATE FUNCTION") and "RETURN 1;" in first.statements[1]
    assert all("DROP" not in s for s in first.statements)
    second = schema.parse_migration(tmp_path / "8_index.sql")
    assert not second.in_transaction and second.statements == ("CREATE INDEX CONCURRENTLY i ON a (id);",)


def test_applies_the_image_files_with_goose_bookkeeping(database: str, image_migrations: Path) -> None:
    versions = list(UPSTREAM_VERSIONS)
    modes = {schema.parse_migration(p).version: schema.parse_migration(p).in_transaction
             for p in image_migrations.glob("*.sql")}
    assert sorted(modes) == versions
    assert sum(not in_transaction for in_transaction in modes.values()) == 4
    report = schema.apply(database, image_migrations)
    assert report.applied == tuple(versions)
    assert report.version == versions[-1] == report.newest_available
    assert _rows(database) == [(0, True)] + [(v, True) for v in versions]
    with psycopg.connect(database) as conn:
        invalid = conn.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid").fetchone()[0]
        assert invalid == 0
        assert schema.current_version(conn) == versions[-1]
        # What goose itself leaves: 6 tables of the service and its own, with their indexes.
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
        indexes = conn.execute("SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'").fetchone()[0]
        assert (tables, indexes) == (7, 23)

    again = schema.apply(database, image_migrations)
    assert again.applied == ()
    assert len(_rows(database)) == len(versions) + 1


def test_resumes_after_an_interrupted_run(database: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    _write(folder, "1_table.sql", "-- +goose Up\nCREATE TABLE items (id int, name text);\n"
                                  "INSERT INTO items VALUES (1, 'a'), (1, 'b');\n")
    # The unique index fails on the duplicate rows halfway through a NO TRANSACTION file,
    # leaving the first index built and an INVALID second one behind.
    _write(folder, "2_indexes.sql", "-- +goose NO TRANSACTION\n-- +goose Up\n"
                                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS items_name ON items (name);\n"
                                    "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS items_id ON items (id);\n")
    with pytest.raises(schema.SchemaError) as caught:
        schema.apply(database, folder)
    assert "2_indexes.sql" in str(caught.value) and "run `up` again to resume" in str(caught.value)
    assert _rows(database) == [(0, True), (1, True)]
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SELECT indisvalid FROM pg_index JOIN pg_class c ON c.oid = indexrelid "
                            "WHERE relname = 'items_id'").fetchone() == (False,)
        conn.execute("DELETE FROM items WHERE name = 'b'")

    report = schema.apply(database, folder)
    assert report.applied == (2,)
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid").fetchone()[0] == 0


def test_never_applies_more_than_the_image_carries(database: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    _write(folder, "1_table.sql", "-- +goose Up\nCREATE TABLE t (id int);\n")
    schema.apply(database, folder)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO goose_db_version (version_id, is_applied) VALUES (99, true)")
    with pytest.raises(schema.SchemaError) as caught:
        schema.apply(database, folder)
    assert "newer than this service image knows" in str(caught.value)


def test_missing_migration_folder_is_explained(database: str, tmp_path: Path) -> None:
    with pytest.raises(schema.SchemaError) as caught:
        schema.apply(database, tmp_path / "nothing-here")
    assert "MF_SERVICE_IMAGE" in str(caught.value)
