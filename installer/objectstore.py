"""The stack's S3-compatible object store: one datastore for every notebook.

    python -m installer.objectstore --data MF_ROOT/objects --listen unix:/tmp/mfstack-.../s3.sock \\
        [--bucket metaflow] [--max-body BYTES]
    python -m installer.objectstore --data DIR --listen 127.0.0.1:9000 --token-file PATH [--internal-secret-file PATH]

The S3 protocol is served by LocalBucket (PyPI `localbucket`, MIT): a
standard-library-only server that keeps each bucket as a folder and each object
as a plain file under `--data` (MF_ROOT/objects/<bucket>/<key>), so objects
persist on Drive with the rest of MF_ROOT, survive restarts, and can be read
with ordinary file tools. It runs here as an ordinary host process (no proot)
inside this module, which adds what the stack needs around it:

- Listening on a unix socket in a 0700 folder (the stack's way): only this user
  reaches the store directly; everyone else comes through the proxy's `/s3/`
  route, which checks the SigV4 signature (installer/s3auth.py) and strips the
  prefix. LocalBucket itself checks no credentials, so with --token-file the store
  checks every signature again (defence in depth: a request that got past the
  proxy still needs a signature for exactly what it does); --signed-prefix /s3
  names the path prefix the clients signed and the proxy stripped.
- Listening on TCP instead (benchmarks, tests) requires --token-file.
- It cannot be desynchronised: the framing of every request is checked before
  LocalBucket sees it (one Content-Length of digits or `chunked` alone, never
  both; no body at all on GET, HEAD, DELETE, OPTIONS), and a declared body that
  was not read to its end (an operation that ignores its body, an error) closes
  the connection with `Connection: close`, so no byte of a body is ever parsed as
  the next request. Bucket names follow S3's rules and keys hold no control
  characters (CR, LF, NUL, ...), else S3's 400 and nothing is written; an
  unexpected error in an operation is an S3 500 that closes the connection, not
  a dropped socket.
- Bodies are checked before anything is written: a body shorter than its
  Content-Length (a client or proxy that went away mid-upload) is refused rather
  than stored truncated; a signed `x-amz-content-sha256`, `Content-MD5` and
  `x-amz-checksum-crc32/sha1/sha256` (header or aws-chunked trailer) must match.
- An object written empty gets a hidden marker beside it; an empty file without one is an upload
  Drive tore (its name arrived without its content) and reads as absent, so the next write of
  that content-addressed object replaces it instead of being skipped.
- A request body may not exceed --max-body (LocalBucket holds one in memory;
  Metaflow uploads anything above 8 MiB in 8 MiB parts).
- The bucket named by --bucket exists once the store answers.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import logging
import os
import re
import signal
import socket
import socketserver
import stat
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import localbucket

from . import procs
from .errors import ConfigError, StackError
from .edge.redact import Redactor, install
from .s3auth import (
    ACCESS_KEY_ID,
    INTERNAL_ACCESS_KEY_ID,
    REGION,
    STREAMING_UNSIGNED_TRAILER,
    UNSIGNED_PAYLOAD,
    CredentialSource,
    S3AuthError,
    verify,
)

__all__ = ["BUCKET", "DATA_ROOT_PREFIX", "DEFAULT_MAX_BODY", "PROXY_PREFIX", "StoreConfig",
           "datastore_root", "empty_marker", "holds_object", "main", "objectstore_service_argv", "serve", "socket_path", "store_answers",
           "ui_backend_env"]

log = logging.getLogger("installer.objectstore")

BUCKET = "metaflow"
DATA_ROOT_PREFIX = "data"                 # METAFLOW_DATASTORE_SYSROOT_S3 = s3://metaflow/data
PROXY_PREFIX = "/s3"                      # the route on the stack's one port
DEFAULT_MAX_BODY = 512 * 1024 * 1024
_READ_BLOCK = 1024 * 1024


# An object stored empty on purpose has this marker beside it. Drive uploads a file's name and its
# content independently: a runtime that dies can leave an object's name on Google with none of its
# content, which reads as an empty object. The marker tells "written empty" from "content lost".
# LocalBucket hides names with its temporary-file prefix from listings.
_EMPTY_MARKER_PREFIX = localbucket.TEMP_PREFIX + "empty--"


def empty_marker(path: Path) -> Path:
    """The marker that says the object at `path` was written empty."""
    return path.with_name(_EMPTY_MARKER_PREFIX + path.name)


def holds_object(path: Path) -> bool:
    """Whether the file at `path` holds an object as it was written: some content, or none with its
    marker. An empty file without the marker is a torn upload and counts as absent, here and in the
    store: Metaflow writes content-addressed objects only when they are absent, so a torn one served
    as present would fail every later run that produces the same content."""
    try:
        info = path.stat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and (info.st_size > 0 or empty_marker(path).exists())


def datastore_root() -> str:
    return f"s3://{BUCKET}/{DATA_ROOT_PREFIX}"


def socket_path(root: Path) -> Path:
    """Where the store's socket lives for the stack at `root`.

    Not under MF_ROOT: on Colab that is a Drive (FUSE) folder, which cannot hold a
    socket, and a socket path must stay under 108 bytes. The folder is per user and root.
    """
    digest = hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"mfstack-{os.getuid()}-{digest}" / "s3.sock"


# ---------------------------------------------------------------- wiring for the stack

def objectstore_service_argv(data_dir: Path, socket: Path, python: str = sys.executable, *,
                             token_file: Path | None = None,
                             internal_secret_file: Path | None = None) -> tuple[str, ...]:
    """The command the stack supervises for the object store (with a token file: checking signatures too)."""
    argv = [python, "-m", "installer.objectstore", "--data", str(data_dir), "--listen", f"unix:{socket}",
            "--bucket", BUCKET]
    if token_file is not None:
        argv += ["--token-file", str(token_file), "--signed-prefix", PROXY_PREFIX]
        if internal_secret_file is not None:
            argv += ["--internal-secret-file", str(internal_secret_file)]
    return tuple(argv)


def ui_backend_env(proxy_port: int, internal_secret: str, host: str = "127.0.0.1") -> tuple[dict[str, str],
                                                                                           dict[str, str]]:
    """(plain env, secret env) for the UI backend container: it reads runs' data from the store.

    It signs with the internal pair, which a token rotation leaves alone. The secret part
    belongs in a 0600 env file, never on a command line.
    """
    plain = {
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": datastore_root(),
        "METAFLOW_S3_ENDPOINT_URL": f"http://{host}:{proxy_port}{PROXY_PREFIX}",
        "AWS_DEFAULT_REGION": REGION,
    }
    secret = {"AWS_ACCESS_KEY_ID": INTERNAL_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": internal_secret}
    return plain, secret


def store_answers(path: Path, timeout: float = 2.0) -> bool:
    """True when a store answers HTTP on the unix socket `path` (a health check for the supervisor).

    Any S3 answer counts: a store that checks signatures refuses this unsigned request with a 403.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            answer = sock.recv(16)
            # Read the answer to its end: closing early makes the store's write fail (a
            # BrokenPipeError traceback in its log for every probe).
            while sock.recv(65536):
                pass
            # The store checks signatures itself: an unsigned probe is answered 403, which is an answer.
            return answer.split(b" ")[1:2] in ([b"200"], [b"403"])
    except OSError:
        return False


# ---------------------------------------------------------------- request bodies

class _BodyError(localbucket.S3Error):
    def __init__(self, code: str, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(status, code, message)


def _read_exact(stream: BinaryIO, length: int) -> bytes:
    parts = []
    left = length
    while left > 0:
        block = stream.read(min(left, _READ_BLOCK))
        if not block:
            raise _BodyError("IncompleteBody", "You did not provide the number of bytes specified by the "
                             "Content-Length HTTP header.")
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _decode_chunks(stream: BinaryIO, limit: int) -> tuple[bytes, dict[str, str]]:
    """Body and trailers of a chunked (HTTP or aws-chunked) stream; refuses a stream cut short."""
    out = bytearray()
    while True:
        line = stream.readline(4096)
        if not line.endswith(b"\n"):
            raise _BodyError("IncompleteBody", "the chunked body ended early")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BodyError("InvalidRequest", "a chunk size is not a hex number") from None
        if size == 0:
            break
        if len(out) + size > limit:
            raise _BodyError("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
        out += _read_exact(stream, size)
        if stream.readline(4096).strip():
            raise _BodyError("InvalidRequest", "a chunk is longer than its declared size")
    trailers: dict[str, str] = {}
    while True:
        line = stream.readline(8192)
        if not line.endswith(b"\n"):
            raise _BodyError("IncompleteBody", "the chunked body ended before its trailers")
        text = line.decode("latin-1").strip()
        if not text:
            break
        name, _, value = text.partition(":")
        trailers[name.strip().lower()] = value.strip()
    return bytes(out), trailers


def _b64_digest(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _BodyError("InvalidDigest", f"{what} is not base64") from None


_CHECKSUMS: dict[str, Callable[[bytes], bytes]] = {
    "content-md5": lambda data: hashlib.md5(data).digest(),
    "x-amz-checksum-crc32": lambda data: zlib.crc32(data).to_bytes(4, "big"),
    "x-amz-checksum-sha1": lambda data: hashlib.sha1(data).digest(),
    "x-amz-checksum-sha256": lambda data: hashlib.sha256(data).digest(),
}


def check_body(body: bytes, headers: object, trailers: dict[str, str]) -> None:
    """Raise unless the body matches every digest the request declares (crc32c/crc64 are not checked)."""
    get = headers.get  # type: ignore[attr-defined]
    declared = (get("x-amz-content-sha256") or "").strip()
    if declared and declared not in (UNSIGNED_PAYLOAD, STREAMING_UNSIGNED_TRAILER) \
            and not declared.startswith("STREAMING-"):
        if hashlib.sha256(body).hexdigest() != declared.lower():
            raise _BodyError("XAmzContentSHA256Mismatch",
                             "The provided 'x-amz-content-sha256' header does not match what was computed.")
    for name, compute in _CHECKSUMS.items():
        value = trailers.get(name) or get(name)
        if value and compute(body) != _b64_digest(value, name):
            raise _BodyError("BadDigest", f"The {name} you specified did not match what we received.")


# ---------------------------------------------------------------- names

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_KEY_BYTES = 1024


def name_problem(path: str) -> tuple[str, str] | None:
    """(S3 error code, message) when the decoded path `/bucket/key` names what S3 would refuse, or None."""
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket:
        return None
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket or bucket.startswith("xn--") \
            or re.fullmatch(r"[0-9.]+", bucket):
        return ("InvalidBucketName", "bucket names are 3 to 63 lower-case letters, digits, '.' and '-', "
                "beginning and ending with a letter or digit")
    if _CONTROL.search(key):
        return "InvalidArgument", "an object key may not hold control characters (CR, LF, NUL, ...)"
    if len(key.encode("utf-8", "surrogateescape")) > _MAX_KEY_BYTES:
        return "KeyTooLongError", "Your key is too long"
    return None


# ---------------------------------------------------------------- the handler

_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


def framing_problem(method: str, headers: object) -> str | None:
    """Why a request's body framing cannot be trusted to delimit it, or None."""
    getall = headers.get_all  # type: ignore[attr-defined]
    encodings = [v.strip().lower() for v in getall("Transfer-Encoding") or []]
    lengths = [v.strip() for v in getall("Content-Length") or []]
    if encodings and lengths:
        return "a request may not carry both Transfer-Encoding and Content-Length"
    if encodings and encodings != ["chunked"]:
        return "the only Transfer-Encoding accepted is chunked"
    if lengths and (len(set(lengths)) > 1 or not lengths[0].isdigit()):
        return "Content-Length must be one number"
    if method in _BODYLESS and (encodings or (lengths and int(lengths[0]) > 0)):
        return f"a {method} request may not carry a body"
    return None


class _Handler(localbucket.S3Handler):
    """LocalBucket's handler with checked framing, complete verified bodies and signature checks."""

    server: _StoreServer  # type: ignore[assignment]
    _body_pending = False   # a declared body not read yet
    _closing_sent = False   # "Connection: close" already among the response headers

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        self._closing_sent = False
        problem = framing_problem(self.command, self.headers)
        self._body_pending = problem is None and self.command not in _BODYLESS and (
            "Transfer-Encoding" in self.headers or int(self.headers.get("Content-Length") or 0) > 0)
        if problem is not None:
            self.close_connection = True
            self._send_error(_BodyError("InvalidRequest", problem))
            return False
        return True

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection" and value.lower() == "close":
            self._closing_sent = True
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        # A body still unread would be parsed as the next request: close after this response instead.
        if self._body_pending and not self._closing_sent:
            self.send_header("Connection", "close")
        super().end_headers()

    def address_string(self) -> str:
        address = self.client_address
        return address[0] if isinstance(address, tuple) and address else "local"

    def log_message(self, format: str, *args: object) -> None:
        pass  # the proxy keeps the access log (with presigned signatures redacted)

    def log_error(self, format: str, *args: object) -> None:
        log.warning("%s", format % args)

    def _dispatch(self, action: Callable[[str, str], None]) -> None:
        path, _, query = self.path.partition("?")
        lookup = self.server.lookup
        if lookup is not None:
            prefix = self.server.signed_prefix
            # The proxy turns "/s3" into "/": a client may have signed either form.
            signed_as = [prefix + path] + ([prefix] if prefix and path == "/" else [])
            refusal: S3AuthError | None = None
            for candidate in signed_as:
                try:
                    verify(self.command, candidate, query, self.headers, lookup)
                    refusal = None
                    break
                except S3AuthError as exc:
                    refusal = refusal or exc
            if refusal is not None:
                self._send_error(localbucket.S3Error(HTTPStatus(refusal.status), refusal.code, refusal.message))
                return
        source = self.headers.get("x-amz-copy-source")
        for name in (unquote(path), *(["/" + unquote(source).lstrip("/")] if source else [])):
            problem = name_problem(name.partition("?")[0])
            if problem is not None:
                self._send_error(_BodyError(*problem))
                return
        try:
            super()._dispatch(action)
        except ConnectionError:
            self.close_connection = True  # the client went away; nobody to answer
        except (OSError, ValueError) as exc:
            log.warning("%s %s failed: %s", self.command, urlsplit(self.path).path, exc.__class__.__name__)
            self._send_error(localbucket.S3Error(HTTPStatus.INTERNAL_SERVER_ERROR, "InternalError",
                                                 "the store could not complete this request"))

    # A torn object (see holds_object) reads as absent: no HEAD, GET, copy or listing shows it, and a
    # write that requires the key to be absent replaces it.
    def _get(self, bucket: str, key: str, include_body: bool) -> None:
        if bucket and key:
            self._refuse_torn(self._object_path(bucket, key))
        super()._get(bucket, key, include_body)

    def _copy_source(self) -> Path:
        return self._refuse_torn(super()._copy_source())

    def _list_entries(self, *args: object, **kwargs: object) -> tuple[list[tuple[str, Path]], list[str], bool, str]:
        contents, prefixes, truncated, last = super()._list_entries(*args, **kwargs)
        return [(key, path) for key, path in contents if holds_object(path)], prefixes, truncated, last

    @staticmethod
    def _refuse_torn(path: Path) -> Path:
        if path.is_file() and not holds_object(path):
            raise localbucket.S3Error(HTTPStatus.NOT_FOUND, "NoSuchKey", "The specified key does not exist.")
        return path

    def _write_object(self, bucket: str, key: str, write: Callable[[BinaryIO], str]) -> str:
        target = self._object_path(bucket, key)
        if target.is_file() and not holds_object(target):
            target.unlink(missing_ok=True)
        etag = super()._write_object(bucket, key, write)  # a refused write (412) leaves the marker as it was
        marker = empty_marker(target)
        if target.stat().st_size > 0:
            marker.unlink(missing_ok=True)
        else:
            try:
                marker.touch()
            except OSError as exc:  # a name too long for a marker: the object reads as possibly torn
                log.info("no empty-object marker for %s: %s", key, exc.__class__.__name__)
        return etag

    def _delete_object(self, bucket: str, key: str) -> None:
        empty_marker(self._object_path(bucket, key)).unlink(missing_ok=True)
        super()._delete_object(bucket, key)

    def _read_body(self) -> bytes:
        self._body_pending = False  # read now, or the request fails and the connection closes
        limit = self.server.max_body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw, _ = _decode_chunks(self.rfile, limit)
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise _BodyError("InvalidArgument", "Content-Length is not a number") from None
            if length > limit:
                raise _BodyError("EntityTooLarge", f"a single request body may hold at most {limit} bytes; "
                                 "upload larger objects in parts (multipart upload)")
            raw = _read_exact(self.rfile, length)
        trailers: dict[str, str] = {}
        declared = self.headers.get("x-amz-content-sha256", "")
        if declared.startswith("STREAMING-") or "aws-chunked" in self.headers.get("Content-Encoding", ""):
            raw, trailers = _decode_chunks(io.BytesIO(raw), limit)
            decoded = self.headers.get("x-amz-decoded-content-length")
            if decoded is not None and decoded.strip() != str(len(raw)):
                raise _BodyError("IncompleteBody", "the body's length differs from x-amz-decoded-content-length")
        check_body(raw, self.headers, trailers)
        return raw

    def _send_error(self, error: localbucket.S3Error) -> None:
        level = logging.WARNING if error.status >= 500 else logging.INFO
        log.log(level, "%s %s refused: %s (%s)", self.command, urlsplit(self.path).path, error.code, error.message)
        super()._send_error(error)


class _StoreServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    daemon_threads = True
    lookup: Callable[[str], str | None] | None = None
    max_body: int = DEFAULT_MAX_BODY
    signed_prefix: str = ""

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that left before its answer was written is one line, not a traceback on stderr.
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.info("a client went away before its answer was written")
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class _UnixServer(_StoreServer, socketserver.UnixStreamServer):
    pass


class _TCPServer(_StoreServer, socketserver.TCPServer):
    allow_reuse_address = True


# ---------------------------------------------------------------- running it

@dataclass(frozen=True)
class StoreConfig:
    data_dir: Path
    listen: str                              # unix:PATH or HOST:PORT
    bucket: str | None = BUCKET
    token_file: Path | None = None           # check signatures in the store (required on TCP)
    internal_secret_file: Path | None = None
    max_body: int = DEFAULT_MAX_BODY
    signed_prefix: str = ""                  # the path prefix clients signed and the proxy stripped


def _private_socket_dir(folder: Path) -> None:
    """Create the socket's folder 0700, or refuse one that someone else could get into."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise ConfigError(f"cannot create the object store's socket folder {folder}: {exc.strerror}",
                          hint="check that the temporary folder is writable") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(f"{folder} is not a folder owned by this user",
                          hint=f"remove {folder}; the store creates it again")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)


def _clear_stale_socket(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigError(f"{path} exists and is not a socket", hint=f"remove {path}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # left behind by a store that died
        return
    finally:
        probe.close()
    raise StackError(f"another object store already answers on {path}",
                     hint="stop it first (python -m installer down), or use another MF_ROOT")


def build_server(config: StoreConfig) -> _StoreServer:
    """Bind the store as configured (raises ConfigError/StackError); serve it with serve_forever()."""
    data = config.data_dir.expanduser().resolve()
    try:
        data.mkdir(parents=True, exist_ok=True)
        if config.bucket:
            (data / config.bucket).mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the object store's folder {data}: {exc.strerror}",
                          hint="check that MF_ROOT is writable (and, on Colab, that Drive is mounted)") from exc
    handler = type("StoreHandler", (_Handler,), {"data_root": data})
    server: _StoreServer
    if config.listen.startswith("unix:"):
        path = Path(config.listen[len("unix:"):])
        if len(str(path).encode()) > 100:
            raise ConfigError(f"socket path too long for a unix socket: {path}", hint="use a shorter path")
        _private_socket_dir(path.parent)
        _clear_stale_socket(path)
        old = os.umask(0o177)
        try:
            server = _UnixServer(str(path), handler)
        finally:
            os.umask(old)
        lookup = CredentialSource(config.token_file, config.internal_secret_file) if config.token_file else None
    else:
        host, sep, port = config.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"--listen must be unix:PATH or HOST:PORT, not {config.listen!r}")
        if config.token_file is None:
            raise ConfigError("a store listening on TCP must check signatures itself",
                              hint="pass --token-file (or listen on unix:PATH behind the proxy)")
        try:
            server = _TCPServer((host.strip("[]") or "127.0.0.1", int(port)), handler)
        except OSError as exc:
            raise StackError(f"the object store cannot listen on {config.listen}: {exc.strerror}",
                             hint="another program holds the port; choose another") from exc
        lookup = CredentialSource(config.token_file, config.internal_secret_file)
    server.lookup = lookup
    server.max_body = config.max_body
    server.signed_prefix = config.signed_prefix.rstrip("/")
    return server


def serve(config: StoreConfig) -> None:
    """Run the store until SIGTERM or SIGINT."""
    server = build_server(config)
    if server.lookup is not None:
        lookup = server.lookup
        install(Redactor(lambda: [s for s in (lookup(ACCESS_KEY_ID), lookup(INTERNAL_ACCESS_KEY_ID)) if s]))
    else:
        install(Redactor())

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("object store serving %s on %s (bucket %s)%s", config.data_dir, config.listen, config.bucket,
             ", checking signatures" if server.lookup else "")
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if config.listen.startswith("unix:"):
            path = Path(config.listen[len("unix:"):])
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # only if empty: it is ours, made at start
            except OSError:
                pass
        log.info("stopped")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m installer.objectstore",
                                     description="The stack's S3-compatible object store (objects as plain files).")
    parser.add_argument("--data", required=True, type=Path, help="folder holding the buckets (MF_ROOT/objects)")
    parser.add_argument("--listen", required=True, help="unix:PATH (behind the proxy) or HOST:PORT")
    parser.add_argument("--bucket", default=BUCKET, help="bucket created at start")
    parser.add_argument("--token-file", type=Path, help="check signatures made with the token's credentials")
    parser.add_argument("--internal-secret-file", type=Path, help="also accept the stack-internal credentials")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="largest single request body")
    parser.add_argument("--signed-prefix", default="",
                        help="path prefix the clients signed and the proxy strips (the stack's: /s3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: returns the exit status."""
    args = _parser().parse_args(argv)
    config = StoreConfig(args.data, args.listen, args.bucket or None, args.token_file, args.internal_secret_file,
                         args.max_body, args.signed_prefix)
    return procs.service_main(lambda: serve(config), quiet=["localbucket"])


if __name__ == "__main__":
    sys.exit(main())
