"""End to end: a remote process with only the connection string runs a real Metaflow flow whose data
goes to the stack's object store through the proxy; the stack's side reads it back.

Run twice: against the parts alone (the proxy `python -m installer.proxy`, the object store
`python -m installer.objectstore` on a unix socket, in front of the shared stack's metadata service),
and against a whole stack of its own brought up by `installer.up` from the local registry (PostgreSQL
and the Metaflow service image in udocker containers, with the stack's own proxy, object store and
settings). Both use the real Metaflow client and boto3. The stack side reads with the UI backend's
configuration (ui_backend_env: internal credentials, endpoint http://127.0.0.1:<port>/s3).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from installer.connection import format_connection
from installer.objectstore import BUCKET, DATA_ROOT_PREFIX, ui_backend_env

from .helpers_s3 import S3Stack, start_s3_stack

REPO = Path(__file__).resolve().parents[1]
BLOB_BYTES = 50 * 1024 * 1024 + 12345

FLOW = textwrap.dedent('''
    import hashlib
    import random

    from metaflow import FlowSpec, step


    class BigArtifactFlow(FlowSpec):
        @step
        def start(self):
            # Random bytes: gzip cannot shrink them, so 50 MB really travel.
            self.blob = random.Random(7).randbytes(%d)
            self.blob_sha256 = hashlib.sha256(self.blob).hexdigest()
            print("made a blob of %%d bytes, sha256 %%s" %% (len(self.blob), self.blob_sha256))
            self.letters = ["a", "b", "c"]
            self.next(self.shout, foreach="letters")

        @step
        def shout(self):
            self.word = self.input.upper() * 3
            print("branch %%s says %%s" %% (self.input, self.word))
            self.next(self.join)

        @step
        def join(self, inputs):
            self.words = sorted(branch.word for branch in inputs)
            self.next(self.end)

        @step
        def end(self):
            print("words: " + " ".join(self.words))


    if __name__ == "__main__":
        BigArtifactFlow()
''' % BLOB_BYTES)

CONNECT = textwrap.dedent('''
    import json, sys
    from installer.clientconfig import connect
    result = connect(sys.argv[1], set_env=False)
    print(json.dumps({"config": str(result.config_path), "kind": result.datastore.kind,
                      "lines": result.lines()}))
''')

STACK_SIDE = textwrap.dedent('''
    import hashlib, json
    from metaflow import Flow, namespace
    namespace(None)
    run = Flow("BigArtifactFlow").latest_run
    start = run["start"].task
    reads = []
    for _ in range(2):
        blob = start.data.blob
        reads.append({
            "blob_bytes": len(blob),
            "blob_sha256": hashlib.sha256(blob).hexdigest(),
            "start_stdout": start.stdout,
            "shout_stdout": sorted(task.stdout for task in run["shout"]),
            "end_stdout": run["end"].task.stdout,
            "words": run["end"].task.data.words,
        })
    print(json.dumps({"pathspec": run.pathspec, "successful": run.successful,
                      "ds_type": start.metadata_dict.get("ds-type"), "reads": reads}))
''')


def _clean_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "USER": "remote-tester", "USERNAME": "remote-tester",
            "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)}


class _WholeStack:
    """The surface of helpers_s3.S3Stack, read off a stack started with `installer.up`."""

    def __init__(self, flags: dict) -> None:
        import installer
        from installer.settings import resolve

        self.settings = resolve(flags)
        self.token = installer.token(**flags)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.store = SimpleNamespace(data_dir=self.settings.objects_dir)
        log_path = self.settings.log_path("proxy")
        self.proxy = SimpleNamespace(port=self.settings.port, log_text=lambda: log_path.read_text())

    def internal_credentials(self) -> SimpleNamespace:
        secret = (self.settings.secrets_dir / "s3-internal").read_text().strip()
        return SimpleNamespace(secret_access_key=secret)


@pytest.fixture(params=["parts", "whole-stack"])
def s3stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[S3Stack | _WholeStack]:
    if request.param == "parts":
        shared = request.getfixturevalue("shared_stack")
        parts = start_s3_stack(tmp_path / "stack", metadata_url=f"http://127.0.0.1:{shared['metadata_port']}")
        yield parts
        parts.stop()
        return
    import installer

    from .conftest import stack_flags

    flags = stack_flags(tmp_path / "root", request.getfixturevalue("registry"))
    installer.up(**flags)
    try:
        yield _WholeStack(flags)
    finally:
        installer.down(**flags)


def test_remote_flow_keeps_its_data_in_the_stacks_store(s3stack: S3Stack, tmp_path: Path) -> None:
    remote_env = _clean_env(tmp_path / "remote-home")
    work = tmp_path / "remote-work"
    work.mkdir()
    (work / "flow.py").write_text(FLOW)
    line = format_connection(s3stack.url, s3stack.token)

    done = subprocess.run([sys.executable, "-c", CONNECT, line], env=remote_env, cwd=work, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["kind"] == "s3", report
    profile = json.loads(Path(report["config"]).read_text())
    assert profile["METAFLOW_DEFAULT_DATASTORE"] == "s3"
    assert profile["METAFLOW_S3_ENDPOINT_URL"] == f"{s3stack.url}/s3"
    assert s3stack.token not in "\n".join(report["lines"])

    run = subprocess.run([sys.executable, "flow.py", "--no-pylint", "run"], env=remote_env, cwd=work,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Nothing of the run's data stayed on the remote machine's disk (Metaflow notes the latest run id there).
    left = sorted(p.name for p in (work / ".metaflow").rglob("*") if p.is_file())
    assert left == ["latest_run"], left

    # The data is plain files in the store's folder on the stack's side.
    flow_dir = s3stack.store.data_dir / BUCKET / DATA_ROOT_PREFIX / "BigArtifactFlow"
    stored = [p for p in flow_dir.rglob("*") if p.is_file()]
    assert any(p.stat().st_size > 50 * 1024 * 1024 for p in stored), sorted(str(p) for p in stored)[:20]

    # The stack's side reads as the UI backend would: internal credentials, loopback endpoint.
    plain, secret = ui_backend_env(s3stack.proxy.port, s3stack.internal_credentials().secret_access_key)
    stack_env = _clean_env(tmp_path / "stack-home")
    stack_env.update(plain)
    stack_env.update(secret)
    stack_env.update({"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": f"{s3stack.url}/service",
                      "METAFLOW_SERVICE_AUTH_KEY": s3stack.token})
    seen = subprocess.run([sys.executable, "-c", STACK_SIDE], env=stack_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert seen.returncode == 0, seen.stderr[-3000:]
    result = json.loads(seen.stdout.strip().splitlines()[-1])
    assert result["successful"] is True
    assert result["ds_type"] == "s3"
    first, second = result["reads"]
    assert first == second  # reading does not consume anything (logs stay where they are)
    expected = hashlib.sha256(__import__("random").Random(7).randbytes(BLOB_BYTES)).hexdigest()
    assert first["blob_bytes"] == BLOB_BYTES
    assert first["blob_sha256"] == expected
    assert f"made a blob of {BLOB_BYTES} bytes, sha256 {expected}" in first["start_stdout"]
    assert [out.strip() for out in first["shout_stdout"]] == ["branch a says AAA", "branch b says BBB",
                                                              "branch c says CCC"]
    assert first["end_stdout"].strip() == "words: AAA BBB CCC"
    assert first["words"] == ["AAA", "BBB", "CCC"]

    # Every byte went through the proxy's /s3 route, each request signed; the artifact in 8 MiB parts.
    log = s3stack.proxy.log_text()
    assert '"PUT /s3/metaflow/data/BigArtifactFlow/' in log
    assert '"GET /s3/metaflow/data/BigArtifactFlow/' in log
    assert '?uploads" 200 ' in log and "&partNumber=7\" 200 " in log
    assert '" 403 ' not in log
