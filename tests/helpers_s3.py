"""Real processes for the object store tests: the store, the proxy in front of it, boto3 clients.

`start_s3_stack` runs, each as its own subprocess: `python -m installer.objectstore`
on a unix socket in a 0700 folder, and `python -m installer.proxy` serving it under
`/s3`, exactly as the stack wires them, with `/service` sent to the metadata service
given (the shared stack's real one) or to the small aiohttp server of helpers_proxy,
which also plays /api (it answers /ping and /api/ping, so /healthz is ok).
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from installer import procs
from installer.objectstore import socket_path
from installer.s3auth import INTERNAL_ACCESS_KEY_ID, Credentials, credentials_for_token
from installer.secrets import read_or_create_secret, read_secret

from .helpers_proxy import REPO, Process, ProxyProcess, make_static_dir, start_proxy, start_upstream


def wait_socket(path: Path, pid: int, log: Path, timeout: float = 30.0) -> None:
    """Poll the store's unix socket until it answers HTTP; fail loudly with its log if it dies."""
    deadline = time.monotonic() + timeout
    last = "no socket"
    while time.monotonic() < deadline:
        if not procs.alive(pid):
            raise AssertionError(f"object store {pid} died while starting; log:\n{procs.tail(log)}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(path))
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1."):
                    return
                last = "no HTTP answer"
        except OSError as exc:
            last = exc.__class__.__name__
        time.sleep(0.1)
    raise AssertionError(f"object store not answering on {path} after {timeout} s ({last}); "
                         f"log:\n{procs.tail(log)}")


@dataclass
class StoreProcess(Process):
    data_dir: Path
    listen: str
    checks: tuple[Path | None, Path | None, str] = (None, None, "")  # token file, internal file, prefix

    @property
    def socket(self) -> Path:
        return Path(self.listen.removeprefix("unix:"))


def start_store(workdir: Path, data_dir: Path, *, listen: str | None = None, token_file: Path | None = None,
                internal_secret_file: Path | None = None, signed_prefix: str = "") -> StoreProcess:
    """The object store as a subprocess: on its unix socket (default), or on TCP; with a token file it checks
    signatures itself (behind the proxy, as the stack runs it, with signed_prefix "/s3")."""
    sock = socket_path(workdir)
    listen = listen or f"unix:{sock}"
    log = workdir / f"objectstore-{int(time.time() * 1000)}.log"
    cmd = [sys.executable, "-m", "installer.objectstore", "--data", str(data_dir), "--listen", listen]
    if token_file is not None:
        cmd += ["--token-file", str(token_file)]
    if internal_secret_file is not None:
        cmd += ["--internal-secret-file", str(internal_secret_file)]
    if signed_prefix:
        cmd += ["--signed-prefix", signed_prefix]
    pid = procs.spawn(cmd, log_path=log, cwd=REPO)
    port = 0
    if listen.startswith("unix:"):
        wait_socket(Path(listen[5:]), pid, log)
    else:
        port = int(listen.rsplit(":", 1)[1])
        _wait_tcp(port, pid, log)
    return StoreProcess(pid, port, log, data_dir, listen, (token_file, internal_secret_file, signed_prefix))


def _wait_tcp(port: int, pid: int, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(pid):
            raise AssertionError(f"object store {pid} died while starting; log:\n{procs.tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"object store not listening on {port}; log:\n{procs.tail(log)}")


@dataclass
class S3Stack:
    workdir: Path
    store: StoreProcess
    proxy: ProxyProcess
    ui: Process
    internal_secret_file: Path

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def endpoint(self) -> str:
        return f"{self.proxy.url}/s3"

    @property
    def token(self) -> str:
        return self.proxy.token

    def credentials(self) -> Credentials:
        return credentials_for_token(self.token)

    def internal_credentials(self) -> Credentials:
        return Credentials(INTERNAL_ACCESS_KEY_ID, read_secret(self.internal_secret_file))

    def restart_store(self) -> None:
        self.store.stop()
        token_file, internal, prefix = self.store.checks
        self.store = start_store(self.workdir, self.store.data_dir, token_file=token_file,
                                 internal_secret_file=internal, signed_prefix=prefix)

    def stop(self) -> None:
        for proc in (self.proxy, self.store, self.ui):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - stop the others whatever happened to one
                pass


def start_s3_stack(workdir: Path, *, metadata_url: str | None = None) -> S3Stack:
    workdir.mkdir(parents=True, exist_ok=True)
    secrets = workdir / "secrets"
    token_file = secrets / "token"
    internal = secrets / "s3-internal"
    read_or_create_secret(token_file)
    read_or_create_secret(internal)
    ui = start_upstream(workdir)
    store = start_store(workdir, workdir / "objects", token_file=token_file, internal_secret_file=internal,
                        signed_prefix="/s3")
    proxy = start_proxy(workdir, metadata_url=metadata_url or ui.url, ui_url=ui.url,
                        static_dir=make_static_dir(workdir), token_file=token_file,
                        extra=["--s3-socket", str(store.socket), "--s3-internal-secret-file", str(internal)])
    return S3Stack(workdir, store, proxy, ui, internal)


def s3_client(endpoint: str, credentials: Credentials, **config: object):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=credentials.access_key_id,
                        aws_secret_access_key=credentials.secret_access_key, region_name="us-east-1",
                        config=Config(**{"signature_version": "s3v4", "s3": {"addressing_style": "path"},
                                         "retries": {"max_attempts": 1}, **config}))
