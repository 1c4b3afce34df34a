"""The public edge under attack: raw-socket probes against a real proxy, a real object store and a
backend that records what reaches it (tests/helpers_edge.py).

Each test asserts what reached the backend or the disk, not only the status code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from installer import procs
from installer.objectstore import BUCKET
from installer.proxy import COOKIE_NAME, cookie_value
from installer.s3auth import UNSIGNED_PAYLOAD, secret_for_token, sign_headers

from . import helpers_edge as he
from . import helpers_proxy as hp
from .helpers_s3 import S3Stack, s3_client, start_s3_stack, start_store

GiB = 1024 ** 3
README = b"public readme\n"
PRIVATE = b"secret model weights\n"
INNER = (b"PUT /metaflow/data/readme.txt HTTP/1.1\r\nHost: x\r\nx-amz-copy-source: /metaflow/data/private/model.pkl\r\n"
         b"Content-Length: 0\r\n\r\n"
         b"DELETE /metaflow/data/private/model.pkl HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
         b"PUT /newbucket HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge")


@pytest.fixture(scope="module")
def edge(workdir: Path, recorder: he.Recorder) -> Iterator[hp.ProxyProcess]:
    """A proxy whose metadata service and UI backend are the recorder."""
    proxy = hp.start_proxy(workdir, metadata_url=recorder.url, ui_url=recorder.url,
                           static_dir=hp.make_static_dir(workdir / "edge"))
    yield proxy
    proxy.stop()


def _seed(stack: S3Stack) -> None:
    objects = stack.store.data_dir / BUCKET / "data"
    (objects / "private").mkdir(parents=True, exist_ok=True)
    (objects / "readme.txt").write_bytes(README)
    (objects / "private" / "model.pkl").write_bytes(PRIVATE)


@pytest.fixture(scope="module")
def wired(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Stack]:
    """Proxy and store as the stack wires them: both check signatures."""
    stack = start_s3_stack(tmp_path_factory.mktemp("wired"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def proxy_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Stack]:
    """The proxy's gate alone: a store that checks no signatures behind it."""
    stack = start_s3_stack(tmp_path_factory.mktemp("proxyonly"))
    stack.store.stop()
    stack.store = start_store(stack.workdir, stack.store.data_dir)
    yield stack
    stack.stop()


@pytest.fixture(params=["wired", "proxy_only"])
def s3stack(request: pytest.FixtureRequest) -> S3Stack:
    stack = request.getfixturevalue(request.param)
    _seed(stack)
    return stack


def _host(stack: S3Stack) -> str:
    return f"127.0.0.1:{stack.proxy.port}"


def _disk_unchanged(stack: S3Stack) -> None:
    objects = stack.store.data_dir / BUCKET / "data"
    assert (objects / "readme.txt").read_bytes() == README
    assert (objects / "private" / "model.pkl").read_bytes() == PRIVATE
    assert not (stack.store.data_dir / "newbucket").exists()


def _still_serves_the_right_answers(stack: S3Stack) -> None:
    """Every later request gets its own response: nothing desynchronised a pooled connection."""
    client = s3_client(stack.endpoint, stack.credentials())
    for _ in range(10):
        assert client.get_object(Bucket=BUCKET, Key="data/readme.txt")["Body"].read() == README
        assert client.get_object(Bucket=BUCKET, Key="data/private/model.pkl")["Body"].read() == PRIVATE


def _signed_target(stack: S3Stack, method: str, signing: str) -> tuple[str, dict[str, str]]:
    path = "/s3/metaflow/data/readme.txt"
    if signing == "presigned":
        operation = {"GET": "get_object", "HEAD": "head_object", "DELETE": "delete_object"}[method]
        url = s3_client(stack.endpoint, stack.credentials()).generate_presigned_url(
            operation, Params={"Bucket": BUCKET, "Key": "data/readme.txt"}, ExpiresIn=600)
        return url.split(_host(stack), 1)[1], {"Host": _host(stack)}
    headers = sign_headers(method, path, "", _host(stack), stack.credentials(), payload_hash=UNSIGNED_PAYLOAD)
    return path, {"Host": _host(stack), **headers}


# ------------------------------------------------------------------------------------------------ smuggling

@pytest.mark.parametrize("signing", ["presigned", "header-signed"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_a_request_smuggled_in_an_s3_body_never_reaches_the_store(s3stack: S3Stack, method: str, framing: str,
                                                                   signing: str) -> None:
    target, headers = _signed_target(s3stack, method, signing)
    raw = he.request_bytes(method, target, headers, INNER, chunked=framing == "chunked")
    answer, closed = he.exchange(s3stack.proxy.port, raw)
    assert he.statuses(answer) == [400], answer[:300]
    assert closed, "a refused request with a body must close the connection"
    _disk_unchanged(s3stack)
    _still_serves_the_right_answers(s3stack)


def test_the_same_signed_request_without_a_body_still_works(s3stack: S3Stack) -> None:
    target, headers = _signed_target(s3stack, "GET", "presigned")
    answer, _ = he.exchange(s3stack.proxy.port, he.request_bytes("GET", target, headers))
    assert he.statuses(answer) == [200] and answer.endswith(README)


def test_a_body_the_store_operation_ignores_closes_the_store_connection(proxy_only: S3Stack) -> None:
    """CreateBucket reads no body: the store closes rather than parse that body as the next request."""
    _seed(proxy_only)
    path = "/s3/bucket-with-body"
    headers = sign_headers("PUT", path, "", _host(proxy_only), proxy_only.credentials(),
                           payload_hash=UNSIGNED_PAYLOAD)
    answer, _ = he.exchange(proxy_only.proxy.port, he.request_bytes("PUT", path, {"Host": _host(proxy_only),
                                                                                  **headers}, INNER))
    assert he.statuses(answer) == [200]
    assert (proxy_only.store.data_dir / "bucket-with-body").is_dir()
    _disk_unchanged(proxy_only)
    _still_serves_the_right_answers(proxy_only)


def _store_exchange(stack: S3Stack, data: bytes) -> tuple[bytes, bool]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(stack.store.socket))
        sock.sendall(data)
        return he.read_until_quiet(sock, 10)


def test_the_store_alone_refuses_unsigned_requests_and_bodies_that_could_desynchronise_it(wired: S3Stack) -> None:
    _seed(wired)
    # Signed for exactly this GET (as the proxy relays it: prefix stripped, Host kept), with a body.
    headers = sign_headers("GET", "/s3/metaflow/data/readme.txt", "", "h", wired.credentials(),
                           payload_hash=UNSIGNED_PAYLOAD)
    answer, closed = _store_exchange(wired, he.request_bytes("GET", "/metaflow/data/readme.txt",
                                                             {"Host": "h", **headers}, INNER))
    assert he.statuses(answer) == [400] and closed
    answer, closed = _store_exchange(wired, b"GET /metaflow/data/readme.txt HTTP/1.1\r\nHost: h\r\n"
                                            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert he.statuses(answer) == [400] and closed
    # Unsigned writes straight to the socket are refused: the store checks signatures itself.
    answer, _ = _store_exchange(wired, INNER)
    assert he.statuses(answer) == [403] and b"AccessDenied" in answer
    _disk_unchanged(wired)
    # A NUL byte in a key is a clear 400, not a crashed handler.
    answer, _ = _store_exchange(wired, b"GET /metaflow/a%00b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert he.statuses(answer) in ([400], [403])


@pytest.mark.parametrize("route", ["/service/flows", "/api/flows"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_api_routes_refuse_bodies_on_bodyless_methods(edge: hp.ProxyProcess, recorder: he.Recorder, route: str,
                                                      framing: str, method: str) -> None:
    before = len(recorder.seen)
    raw = he.request_bytes(method, route, {"Host": "127.0.0.1", "x-api-key": edge.token},
                           b"DELETE /flows/X HTTP/1.1\r\nHost: x\r\n\r\n", chunked=framing == "chunked")
    answer, closed = he.exchange(edge.port, raw)
    assert he.statuses(answer) == [400] and closed
    assert len(recorder.seen) == before, "nothing may reach the backend"


# ------------------------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("target", ["/service/flows/../admin", "/service/flows/%2e%2e/admin", "/api/a/%2E/b",
                                    "/service/a%2fb", "/api/a%5cb", "/api/x%00y", "/service/./flows"])
def test_dot_segments_and_encoded_separators_never_reach_the_api(edge: hp.ProxyProcess, recorder: he.Recorder,
                                                                  target: str) -> None:
    before = len(recorder.seen)
    status, _, body = hp.raw_request(edge.port, "GET", target, headers={"x-api-key": edge.token})
    assert status == 400 and b"path" in body
    assert len(recorder.seen) == before


def test_trace_is_refused_and_upstream_cookies_server_and_cors_are_dropped(edge: hp.ProxyProcess,
                                                                            recorder: he.Recorder) -> None:
    before = len(recorder.seen)
    status, _, _ = hp.raw_request(edge.port, "TRACE", "/service/flows", headers={"x-api-key": edge.token})
    assert status == 405 and len(recorder.seen) == before
    status, headers, _ = hp.raw_request(edge.port, "GET", "/service/flows",
                                        headers={"x-api-key": edge.token, "Origin": f"http://127.0.0.1:{edge.port}"})
    assert status == 200 and recorder.seen[-1].target == "/flows"
    assert "set-cookie" not in headers and "RecorderServer" not in headers.get("server", "")
    # The UI is served from the entry point's own origin: no upstream may open it to other sites.
    assert not [name for name in headers if name.lower().startswith("access-control-")], headers


def test_client_forwarding_headers_are_not_trusted(edge: hp.ProxyProcess, recorder: he.Recorder) -> None:
    status, _, _ = hp.raw_request(edge.port, "GET", "/service/flows", headers={
        "x-api-key": edge.token, "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Host": "evil.example",
        "Cf-Connecting-Ip": "198.51.100.8", "Forwarded": "for=198.51.100.9"})
    assert status == 200
    seen = {k.lower(): v for k, v in recorder.seen[-1].headers.items()}
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{edge.port}"
    assert "cf-connecting-ip" not in seen and "forwarded" not in seen
    # A cookie session's Origin check uses the Host, never a client's X-Forwarded-Host.
    cookie = {"Cookie": f"{COOKIE_NAME}={cookie_value(edge.token)}"}
    status, _, _ = hp.raw_request(edge.port, "POST", "/service/flows", body=b"{}", headers={
        **cookie, "Origin": "https://evil.example", "X-Forwarded-Host": "evil.example"})
    assert status == 403


def test_no_answer_names_the_proxy_software_or_its_versions(edge: hp.ProxyProcess) -> None:
    key = {"x-api-key": edge.token}
    answers = [hp.raw_request(edge.port, "GET", "/service/flows", headers=key),        # relayed
               hp.raw_request(edge.port, "GET", "/healthz"),                            # its own JSON
               hp.raw_request(edge.port, "GET", "/service/flows"),                      # 401
               hp.raw_request(edge.port, "TRACE", "/service/flows", headers=key),      # 405
               hp.raw_request(edge.port, "GET", "/", headers=key),                      # a UI file
               hp.raw_request(edge.port, "GET", "/static/js/missing.js", headers=key),  # 404
               hp.raw_request(edge.port, "GET", "/", headers={"Accept": "text/html"})]  # the sign-in page
    malformed, _ = he.exchange(edge.port, b"GET /x HTTP/1.1\r\nHost: h\r\nBad\x01Header: v\r\n\r\n")
    assert he.statuses(malformed) == [400]
    heads = [str(headers) for _, headers, _ in answers] + [malformed.split(b"\r\n\r\n")[0].decode()]
    for (_, headers, _), head in zip(answers, heads):
        assert headers.get("server") == "metaflow-stack", head
    for head in heads:
        assert "aiohttp" not in head.lower() and "python" not in head.lower() and "Recorder" not in head, head


# ------------------------------------------------------------------------------------------------ no-auth

@pytest.fixture(scope="module")
def open_edge(workdir: Path, recorder: he.Recorder) -> Iterator[hp.ProxyProcess]:
    proxy = hp.start_proxy(workdir / "open", metadata_url=recorder.url, ui_url=recorder.url,
                           static_dir=hp.make_static_dir(workdir / "open"), extra=["--no-auth"])
    yield proxy
    proxy.stop()


def test_no_auth_answers_only_loopback_host_names(open_edge: hp.ProxyProcess, recorder: he.Recorder) -> None:
    before = len(recorder.seen)
    for host in ("rebind.attacker.example", "rebind.attacker.example:%d" % open_edge.port, "127.0.0.1.nip.io",
                 "10.0.0.1"):
        answer, _ = he.exchange(open_edge.port, he.request_bytes("GET", "/service/flows", {"Host": host}))
        assert he.statuses(answer) == [421], host
    assert len(recorder.seen) == before
    for host in (f"127.0.0.1:{open_edge.port}", f"localhost:{open_edge.port}", "[::1]"):
        answer, _ = he.exchange(open_edge.port, he.request_bytes("GET", "/service/flows", {"Host": host}))
        assert he.statuses(answer) == [200], host
    assert len(recorder.seen) == before + 3


def test_no_auth_refuses_cross_site_writes_and_websockets(open_edge: hp.ProxyProcess,
                                                          recorder: he.Recorder) -> None:
    before = len(recorder.seen)
    host = f"127.0.0.1:{open_edge.port}"
    post = he.request_bytes("POST", "/service/flows/X/run", {"Host": host, "Origin": "https://evil.example",
                                                             "Content-Type": "text/plain"}, b"{}")
    answer, closed = he.exchange(open_edge.port, post)
    assert he.statuses(answer) == [403] and closed
    ws = he.request_bytes("GET", "/api/ws", {"Host": host, "Origin": "https://evil.example", "Upgrade": "websocket",
                                             "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                                             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    answer, _ = he.exchange(open_edge.port, ws)
    assert he.statuses(answer) == [403]
    assert len(recorder.seen) == before
    same = he.request_bytes("POST", "/service/flows/X/run", {"Host": host, "Origin": f"http://{host}"}, b"{}")
    answer, _ = he.exchange(open_edge.port, same)
    assert he.statuses(answer) == [200] and recorder.seen[-1].body == b"{}"


# ------------------------------------------------------------------------------------------------ redaction

def test_no_credential_reaches_any_log_or_error_page(wired: S3Stack) -> None:
    proxy, token = wired.proxy, wired.token
    cookie = cookie_value(token)
    s3_secret = secret_for_token(token)
    malformed = [
        f"GET /?x=1;token={token} HTTP/1.1\r\nHost: h\r\n\r\n".encode(),
        f"GET /?x=%26token%3D{token} HTTP/1.1\r\nHost: h\r\n\r\n".encode(),
        f"GET /api/x HTTP/1.1\r\nHost: h\r\nx-api-key: {token}\r\nBad\x01Header: v\r\n\r\n".encode(),
        f"GET /api/x HTTP/1.1\r\nx-api-key: {token}\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        .encode(),
        f"GET /api/x HTTP/1.1\r\nCookie: {COOKIE_NAME}={cookie}\r\nHost\r\n\r\n".encode(),
        f"G\x00T /s3/?X-Amz-Signature={s3_secret} HTTP/1.1\r\nx-api-key: {token}\r\n\r\n".encode(),
    ]
    for raw in malformed:
        answer, _ = he.exchange(proxy.port, raw)
        assert token.encode() not in answer and cookie.encode() not in answer
    url = s3_client(wired.endpoint, wired.credentials()).generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "data/readme.txt"}, ExpiresIn=600)
    signature = url.rsplit("X-Amz-Signature=", 1)[1]
    requests.get(url, timeout=10)
    time.sleep(0.5)
    logs = proxy.log_text() + wired.store.log_text()
    assert "refused a malformed request" in logs, "the probes above must have been logged"
    for secret in (token, cookie, s3_secret, signature):
        assert secret not in logs
    for log in (proxy.log, wired.store.log):
        assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_spawned_service_logs_are_private(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "service.log"
    log.parent.mkdir()
    log.write_text("made loose by someone\n")
    os.chmod(log, 0o644)
    pid = procs.spawn([sys.executable, "-c", "print('hello')"], log_path=log)
    procs.wait_gone([pid], timeout=10)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


# ------------------------------------------------------------------------------------------------ throttle

def test_a_client_cannot_escape_its_penalty_by_rotating_forwarding_headers(edge: hp.ProxyProcess) -> None:
    for i in range(8):
        requests.get(edge.url + "/api/x", headers={"x-api-key": "bad-" + "c" * 40, "X-Forwarded-For": f"10.9.9.{i}",
                                                   "Cf-Connecting-Ip": f"10.8.8.{i}"}, timeout=30)
    started = time.monotonic()
    response = requests.get(edge.url + "/api/x", headers={"x-api-key": "bad-" + "c" * 40,
                                                          "X-Forwarded-For": "10.9.9.200"}, timeout=30)
    assert response.status_code == 401
    assert time.monotonic() - started >= 0.2, "the rotated header must not have reset the penalty"


def test_failures_have_a_global_budget_that_never_refuses_the_valid_token(tmp_path: Path,
                                                                         recorder: he.Recorder) -> None:
    proxy = hp.start_proxy(tmp_path, metadata_url=recorder.url, ui_url=recorder.url,
                           static_dir=hp.make_static_dir(tmp_path), extra=["--behind-tunnel"])
    try:
        outcomes: list[int] = []
        valid: list[int] = []
        lock = threading.Lock()

        def guess(worker: int) -> None:
            with requests.Session() as session:
                for i in range(25):
                    ip = f"10.{worker}.{i}.1"  # a new identity for every guess
                    status = session.get(proxy.url + "/api/x", headers={"x-api-key": f"guess-{worker}-{i}" * 4,
                                                                        "Cf-Connecting-Ip": ip}, timeout=30).status_code
                    with lock:
                        outcomes.append(status)

        def use_the_token() -> None:
            with requests.Session() as session:
                for i in range(20):
                    status = session.get(proxy.url + f"/api/valid-{i}", headers={
                        "x-api-key": proxy.token, "Cf-Connecting-Ip": "10.7.7.7"}, timeout=30).status_code
                    with lock:
                        valid.append(status)

        started = time.monotonic()
        threads = [threading.Thread(target=guess, args=(w,)) for w in range(8)]
        threads.append(threading.Thread(target=use_the_token))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        checked = outcomes.count(401)
        assert checked + outcomes.count(429) == 200
        assert outcomes.count(429) > 0 and checked <= 100 + 10 * elapsed + 5, (checked, elapsed)
        assert valid == [200] * 20, valid
        # The budget is still spent (it refills at 10 a second): new strangers' wrong guesses are mostly
        # refused at once, and the token still works.
        with requests.Session() as session:
            later = [session.get(proxy.url + "/api/x", headers={"x-api-key": "another-guess" * 4,
                                                                "Cf-Connecting-Ip": f"10.200.0.{i}"}, timeout=30)
                     for i in range(20)]
        refused = [r for r in later if r.status_code == 429]
        assert len(refused) >= 10 and all(int(r.headers["Retry-After"]) >= 1 for r in refused), \
            [r.status_code for r in later]
        admitted = requests.get(proxy.url + "/api/after", headers={"x-api-key": proxy.token,
                                                                   "Cf-Connecting-Ip": "10.200.0.1"}, timeout=30)
        assert admitted.status_code == 200
        assert [s.target for s in recorder.seen if "valid-" in s.target or "after" in s.target][-21:] == \
            [f"/api/valid-{i}" for i in range(20)] + ["/api/after"]
    finally:
        proxy.stop()


# ------------------------------------------------------------------------------------------------ slow clients

def test_slowloris_connections_are_closed_within_the_head_deadline(edge: hp.ProxyProcess) -> None:
    socks = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", edge.port), timeout=5)
        sock.sendall(b"GET /api/x HTTP/1.1\r\nHost: h\r\n")
        socks.append(sock)
    started = time.monotonic()
    closed_at: list[float] = []
    try:
        while len(closed_at) < len(socks) and time.monotonic() - started < 30:
            for sock in socks:
                if sock.fileno() == -1:
                    continue
                try:
                    sock.sendall(b"X")  # one more byte of a header that never ends
                    sock.settimeout(0.05)
                    if sock.recv(4096) == b"":
                        raise ConnectionResetError
                except socket.timeout:
                    continue
                except OSError:
                    closed_at.append(time.monotonic() - started)
                    sock.close()
            time.sleep(0.5)
        # Meanwhile a normal client is served.
        assert requests.get(edge.url + "/api/x", headers={"x-api-key": edge.token}, timeout=10).status_code == 200
    finally:
        for sock in socks:
            sock.close()
    assert len(closed_at) == 50 and max(closed_at) < 20, closed_at


def test_connections_per_client_are_capped(edge: hp.ProxyProcess) -> None:
    socks = [socket.create_connection(("127.0.0.1", edge.port), timeout=5) for _ in range(256)]
    try:
        extra = socket.create_connection(("127.0.0.1", edge.port), timeout=5)
        answer, closed = he.read_until_quiet(extra, 5)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and closed
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.5)
    assert requests.get(edge.url + "/api/x", headers={"x-api-key": edge.token}, timeout=10).status_code == 200


@pytest.mark.parametrize("route", ["/service/flows", "/s3/metaflow/data/big.bin"])
def test_an_unauthenticated_1_gib_upload_is_cut_off_early(wired: S3Stack, route: str) -> None:
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", wired.proxy.port), timeout=10) as sock:
        sock.sendall(f"PUT {route} HTTP/1.1\r\nHost: h\r\nContent-Length: {GiB}\r\n\r\n".encode())
        try:
            for block in he.blocks(GiB):
                sock.sendall(block)
                sent += len(block)
        except OSError:
            pass
        answer, _ = he.read_until_quiet(sock, 5)
    assert sent < 64 * 1024 * 1024, f"{sent} bytes were accepted before the connection closed"
    assert not (wired.store.data_dir / BUCKET / "data" / "big.bin").exists()
    if answer:  # the refusal, when it arrived before the reset
        assert he.statuses(answer)[0] in (401, 403) and b"connection: close" in answer.lower()


def test_100_continue_comes_only_after_the_credentials_were_checked(edge: hp.ProxyProcess,
                                                                    recorder: he.Recorder) -> None:
    head = "PUT /service/flows/X HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n"
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(f"{head}x-api-key: wrong-{'z' * 40}\r\n\r\n".encode())
        answer, _ = he.read_until_quiet(sock, 5)
    assert he.statuses(answer) == [401]
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(f"{head}x-api-key: {edge.token}\r\n\r\n".encode())
        first, _ = he.read_until_quiet(sock, 5)
        assert first.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"body")
        rest, _ = he.read_until_quiet(sock, 5)
    assert he.statuses(first + rest) == [100, 200]
    assert recorder.seen[-1].body == b"body"


def test_redaction_filter_covers_encoded_and_quoted_forms() -> None:
    from installer.edge.redact import Redactor

    token = "T0ken-" + hashlib.sha256(b"x").hexdigest()[:30]
    redactor = Redactor(lambda: [token])
    for text in (f"/?x=1;token={token}", f"/?x=%26token%3D{token}", f"b'x-api-key: {token}\\r\\nHost'",
                 f"/?other=%2F{token}", f"cookie: a=1; mf_stack_session=abc{token}"):
        assert token not in redactor.text(text), text
    unknown = "guess-" + "q" * 30
    assert unknown not in Redactor().text(f"GET /?api_key={unknown}&x=1")
    assert Redactor().text("GET /?x=1&y=2") == "GET /?x=1&y=2"


def test_buffered_log_lines_are_redacted_as_a_batch_and_survive_a_token_rotation(tmp_path: Path) -> None:
    from installer.edge.logbuffer import BufferedHandler
    from installer.edge.redact import Redactor

    secrets = ["first-token-" + "a" * 20]
    out = (tmp_path / "log").open("w")
    handler = BufferedHandler(out, Redactor(lambda: secrets), delay=0.1)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.buffered")
    logger.propagate, logger.handlers = False, [handler]
    logger.setLevel(logging.INFO)

    async def in_the_loop() -> None:  # as in the proxy: batches are written by a timer of the running loop
        logger.info("GET /a?token=%s", "guessed-value-12345")
        logger.info("path /service/%s", secrets[0])
        assert (tmp_path / "log").read_text() == "", "nothing is written before the batch is due"
        old = secrets[0]
        secrets[:] = ["second-token-" + "b" * 20]  # rotated before the batch is written
        handler.flush()
        text = (tmp_path / "log").read_text()
        assert text.splitlines() == ["GET /a?token=REDACTED", "path /service/REDACTED"]
        logger.warning("seen %s and %s", old, secrets[0])  # a warning is written at once
        assert (tmp_path / "log").read_text().splitlines()[-1] == "seen REDACTED and REDACTED"
        logger.info("later")
        await asyncio.sleep(0.3)
        assert (tmp_path / "log").read_text().splitlines()[-1] == "later", "written when the batch is due"

    try:
        asyncio.run(in_the_loop())
    finally:
        handler.close()
        out.close()


def test_access_lines_buffered_by_the_proxy_are_written_when_it_is_stopped(workdir: Path,
                                                                          recorder: he.Recorder) -> None:
    proxy = hp.start_proxy(workdir, metadata_url=recorder.url, ui_url=recorder.url,
                           static_dir=hp.make_static_dir(workdir / "stopped"))
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            for n in range(20):
                sock.sendall(f"GET /service/n{n}/ping HTTP/1.1\r\nHost: h\r\nx-api-key: {proxy.token}\r\n\r\n"
                             .encode())
                answer = b""
                while not answer.endswith(b"pong"):
                    answer += sock.recv(65536)
            procs.send(proxy.pid, signal.SIGTERM)  # at once: the last lines are still in the buffer
        assert not procs.wait_gone([proxy.pid], timeout=10)
    finally:
        proxy.stop()
    text = proxy.log_text()
    for n in range(20):
        assert f'"GET /service/n{n}/ping" 200' in text
    assert proxy.token not in text
