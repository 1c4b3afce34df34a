"""Metadata API of the TEST stand-in image.

Plays the part of the upstream metadata service offline, with the same
contract: ``python3 -m services.metadata_service.server`` listens on
``MF_METADATA_HOST``:``MF_METADATA_PORT`` (0.0.0.0:8080), honours
``PATH_PREFIX`` and answers ``GET /ping`` with ``pong`` and a
``METADATA_SERVICE_VERSION`` header.

The storage is the file store of the ``metaflow-local-service`` package
(not PostgreSQL): records live under ``MF_STANDIN_DATA_DIR``
(default /var/lib/metaflow-standin) inside the container. The
``MF_METADATA_DB_*`` settings are accepted and ignored.

On top of that package this module adds the routes the Metaflow client
needs and the package lacks: ``GET /flows`` and ``GET`` of one artifact
(latest attempt, or a given one).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
from typing import Any, Optional

SERVICE_VERSION = os.environ.get("MF_STANDIN_SERVICE_VERSION", "2.5.1")
DEFAULT_DATA_DIR = "/var/lib/metaflow-standin"

log = logging.getLogger("metadata-standin")

_ARTIFACT_FILE = re.compile(r"^(\d+)_artifact_(.+)\.json$")


def normalise_prefix(raw: Optional[str]) -> str:
    """'' for no prefix, else '/a/b' (leading slash, no trailing slash)."""
    if not raw:
        return ""
    prefix = "/" + raw.strip().strip("/")
    return "" if prefix == "/" else prefix


def _artifact_attempts(store: Any, flow: str, run: str, step: str, task: str,
                       name: str) -> dict[int, dict[str, Any]]:
    """Map attempt number -> artifact record for one artifact name."""
    provider = store._local()
    meta_dir = provider._get_metadir(flow, run, step, task)
    found: dict[int, dict[str, Any]] = {}
    if not meta_dir or not os.path.isdir(meta_dir):
        return found
    for path in glob.glob(os.path.join(glob.escape(meta_dir), "*_artifact_*.json")):
        match = _ARTIFACT_FILE.match(os.path.basename(path))
        if not match or match.group(2) != name:
            continue
        record = provider._read_json_file(path)
        if record is not None:
            found[int(match.group(1))] = record
    return found


def build_app(data_dir: str, prefix: str = ""):
    """Return the ASGI app: the package's app, extended, under ``prefix``."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, Response
    from metaflow_local_service import store
    from metaflow_local_service.server import create_app

    os.makedirs(data_dir, exist_ok=True)
    inner = create_app(data_dir)

    # Replace the package's /ping so the advertised version is ours.
    inner.router.routes = [
        r for r in inner.router.routes if getattr(r, "path", None) != "/ping"
    ]

    @inner.get("/ping")
    async def ping() -> Response:
        return Response(
            content="pong",
            media_type="text/plain",
            headers={"METADATA_SERVICE_VERSION": SERVICE_VERSION},
        )

    @inner.get("/flows")
    async def list_flows() -> JSONResponse:
        return JSONResponse(store.list_all_flows())

    def _one_artifact(flow: str, run: str, step: str, task: str, name: str,
                      attempt: Optional[int]) -> JSONResponse:
        by_attempt = _artifact_attempts(store, flow, run, step, task, name)
        if attempt is None and by_attempt:
            attempt = max(by_attempt)
        record = by_attempt.get(attempt) if attempt is not None else None
        if record is None:
            raise HTTPException(status_code=404, detail="Artifact not found")
        return JSONResponse(record)

    artifact_path = ("/flows/{flow}/runs/{run}/steps/{step}/tasks/{task}"
                     "/artifacts/{name}")

    @inner.get(artifact_path)
    async def get_artifact(flow: str, run: str, step: str, task: str,
                           name: str) -> JSONResponse:
        return _one_artifact(flow, run, step, task, name, None)

    @inner.get(artifact_path + "/attempt/{attempt}")
    async def get_artifact_attempt(flow: str, run: str, step: str, task: str,
                                   name: str, attempt: int) -> JSONResponse:
        return _one_artifact(flow, run, step, task, name, attempt)

    if not prefix:
        return inner
    outer = FastAPI(title="metadata service stand-in (test image)",
                    docs_url=None, redoc_url=None, openapi_url=None)
    outer.mount(prefix, inner)
    return outer


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("MF_STANDIN_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    host = os.environ.get("MF_METADATA_HOST", "0.0.0.0")
    port = int(os.environ.get("MF_METADATA_PORT", "8080"))
    prefix = normalise_prefix(os.environ.get("PATH_PREFIX"))
    data_dir = os.environ.get("MF_STANDIN_DATA_DIR", DEFAULT_DATA_DIR)

    log.info("TEST STAND-IN for the Metaflow metadata service (version %s)",
             SERVICE_VERSION)
    log.info("records kept under %s; MF_METADATA_DB_* settings are ignored",
             data_dir)
    app = build_app(data_dir, prefix)

    import uvicorn

    log.info("listening on %s:%d prefix=%r", host, port, prefix or "/")
    # uvicorn exits cleanly on SIGTERM/SIGINT, like the real service.
    uvicorn.run(app, host=host, port=port, log_level="warning",
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
