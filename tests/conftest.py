"""Shared fixtures: a clean environment for every test, the local registry, a stack on free ports.

The stack runs exactly as users run it: the images are the production ones named in
images/production.json (the Metaflow service built from upstream's release archives,
PostgreSQL 15), served under those names by a real registry on 127.0.0.1
(scripts/build_images.sh). Only `registry` differs from the defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from . import helpers_edge as he

REPO = Path(__file__).resolve().parent.parent
REGISTRY = os.environ.get("MFSTACK_TEST_REGISTRY", "http://127.0.0.1:5000")
PRODUCTION_IMAGES = json.loads((REPO / "images" / "production.json").read_text())
# The verified upstream archives scripts/build_images.sh staged for the service image.
UPSTREAM_STAGE = Path(os.environ.get("MFSTACK_CACHE", "/var/cache/mfstack")) / "upstream"
# Pulled images are shared between tests (pulling is tested once, on an empty folder).
SHARED_UDOCKER_DIR = Path(os.environ.get("MFSTACK_TEST_UDOCKER_DIR", "/var/tmp/mfstack-test-udocker"))

_SETTING_VARS = ("MF_ROOT", "PGDATA_DIR", "MF_PORT", "MF_BIND", "MF_POSTGRES_IMAGE", "MF_SERVICE_IMAGE",
                 "MF_REGISTRY", "UDOCKER_DIR", "MF_METADATA_PORT", "MF_UI_METADATA_PORT", "MF_DB_PORT",
                 "MF_TOKEN", "MF_NO_AUTH", "MF_SNAPSHOT_DIR", "MF_START_TIMEOUT", "METAFLOW_PROFILE",
                 "METAFLOW_SERVICE_URL", "METAFLOW_DEFAULT_METADATA", "METAFLOW_SERVICE_AUTH_KEY",
                 "UDOCKER_USE_PROOT_EXECUTABLE", "MF_MIRRORS", "MF_REGISTRY_USER", "MF_REGISTRY_PASSWORD",
                 "MF_REGISTRY_AUTH_FILE")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the developer's shell."""
    for name in _SETTING_VARS:
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def registry() -> str:
    """The local registry with the project's images; fails loudly when it is not there."""
    try:
        catalog = requests.get(f"{REGISTRY}/v2/_catalog", timeout=5).json()
    except (requests.RequestException, ValueError) as exc:
        pytest.fail(f"the local registry {REGISTRY} is not answering ({exc}); "
                    "run scripts/build_images.sh (scripts/test.sh does it for you)")
    for ref in PRODUCTION_IMAGES.values():
        name = ref.split(":")[0]
        name = name if "/" in name else f"library/{name}"
        if name not in catalog.get("repositories", []):
            pytest.fail(f"{ref} is not in the local registry; run scripts/build_images.sh")
    return REGISTRY


def upstream_archive() -> Path:
    """The metaflow-service release archive the service image was built from; fails loudly when missing."""
    path = UPSTREAM_STAGE / "metaflow-service-v2.5.1.tar.gz"
    if not path.is_file():
        pytest.fail(f"{path} is missing; run scripts/build_images.sh (scripts/test.sh does it for you)")
    return path


def stack_flags(root: Path, registry: str, udocker_dir: Path = SHARED_UDOCKER_DIR) -> dict:
    return {
        "root": str(root),
        "udocker_dir": str(udocker_dir),
        "registry": registry,
        "port": str(free_port()),
        "metadata_port": str(free_port()),
        "ui_port": str(free_port()),
        "db_port": str(free_port()),
        "start_timeout": "90",
    }


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory: pytest.TempPathFactory, registry: str) -> Iterator[dict]:
    """One stack for the tests that only read from it, or leave it running as they found it."""
    import installer

    flags = stack_flags(tmp_path_factory.mktemp("shared-stack") / "root", registry)
    status = installer.up(wait_ui=True, **flags)
    if not status.running:
        pytest.fail(f"the shared stack did not start: {status}")
    yield flags
    installer.down(**flags)


@pytest.fixture
def stack(tmp_path: Path, registry: str) -> Iterator[dict]:
    """Settings for a stack of our own on free ports; whatever it started is stopped afterwards."""
    import installer

    flags = stack_flags(tmp_path / "root", registry)
    yield flags
    installer.down(**flags)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch folder the postgres user can enter, removed afterwards (tests with native PostgreSQL)."""
    from tests.helpers_pg import make_workdir

    path = make_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dest(workdir: Path) -> Path:
    """A plain folder standing in for the snapshot folder on Google Drive."""
    path = workdir / "drive"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def recorder() -> Iterator[he.Recorder]:
    """A backend that records every request that reached it, for one test module."""
    rec = he.start_recorder()
    yield rec
    rec.stop()
