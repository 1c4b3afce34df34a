"""No stranger can lock out the token holders, crash the signature check, or fill the disk.

Each test runs the real proxy (`python -m installer.proxy`) with the real object
store behind `/s3/` and Recorder backends for the metadata service and the UI
backend, floods or probes it as an attacker would, and asserts what the token
holders got, what reached the backends, what reached the disk and the log.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import requests
from botocore.exceptions import ClientError

from installer.objectstore import BUCKET
from installer.proxy import COOKIE_NAME, cookie_value
from installer.s3auth import INTERNAL_ACCESS_KEY_ID, UNSIGNED_PAYLOAD, Credentials, sign_headers
from installer.secrets import read_or_create_secret, read_secret

from . import helpers_edge as he
from . import helpers_proxy as hp
from .helpers_s3 import StoreProcess, s3_client, start_store

FLOOD_S = 4.0
FLOOD_TASKS = 200          # more than the 128 failures that may wait out a penalty at once
WRONG_KEY = "wrong-" + "k" * 40


@dataclass
class Edge:
    proxy: hp.ProxyProcess
    store: StoreProcess
    recorder: he.Recorder
    internal: Path

    @property
    def token(self) -> str:
        return self.proxy.token

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def s3(self, credentials: Credentials | None = None):
        return s3_client(f"{self.proxy.url}/s3", credentials or Credentials("metaflow-stack", _s3_secret(self)))

    def internal_s3(self):
        return self.s3(Credentials(INTERNAL_ACCESS_KEY_ID, read_secret(self.internal)))

    def stop(self) -> None:
        for proc in (self.proxy, self.store):
            proc.stop()


def _s3_secret(edge: Edge) -> str:
    from installer.s3auth import secret_for_token
    return secret_for_token(edge.token)


def _start(workdir: Path, recorder: he.Recorder, extra: tuple[str, ...] = ()) -> Edge:
    workdir.mkdir(parents=True, exist_ok=True)
    token_file, internal = workdir / "secrets" / "token", workdir / "secrets" / "s3-internal"
    read_or_create_secret(token_file)
    read_or_create_secret(internal)
    store = start_store(workdir, workdir / "objects", token_file=token_file, internal_secret_file=internal,
                        signed_prefix="/s3")
    proxy = hp.start_proxy(workdir, metadata_url=recorder.url, ui_url=recorder.url,
                           static_dir=hp.make_static_dir(workdir), token_file=token_file,
                           extra=["--s3-socket", str(store.socket), "--s3-internal-secret-file", str(internal),
                                  *extra])
    (workdir / "objects" / BUCKET / "data").mkdir(parents=True, exist_ok=True)
    (workdir / "objects" / BUCKET / "data" / "readme.txt").write_bytes(b"readme\n")
    return Edge(proxy, store, recorder, internal)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, recorder: he.Recorder) -> Iterator[Edge]:
    stack = _start(tmp_path_factory.mktemp("lockout"), recorder)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def tunnel_edge(tmp_path_factory: pytest.TempPathFactory, recorder: he.Recorder) -> Iterator[Edge]:
    stack = _start(tmp_path_factory.mktemp("tunnel"), recorder, ("--behind-tunnel",))
    yield stack
    stack.stop()


# ------------------------------------------------------------------------------------------------ malformed SigV4
# (first in this file: the floods below leave 127.0.0.1 with a penalty)

def _malformed_sigv4(edge: Edge) -> list[bytes]:
    def header_signed(date: str, extra: str = "", signed: str = "host;x-amz-content-sha256;x-amz-date") -> bytes:
        return (f"GET /s3/metaflow/x HTTP/1.1\r\nHost: {edge.host}\r\nConnection: close\r\nx-amz-date: {date}\r\n"
                f"x-amz-content-sha256: {UNSIGNED_PAYLOAD}\r\n{extra}"
                f"Authorization: AWS4-HMAC-SHA256 Credential=metaflow-stack/{date[:8]}/us-east-1/s3/aws4_request, "
                f"SignedHeaders={signed}, Signature={'0' * 64}\r\n\r\n").encode("latin-1")

    now = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return [
        header_signed("20261399T999999Z"),
        header_signed("00000101T000000Z"),
        header_signed("99999999T999999Z"),
        header_signed(now, "x-amz-meta-a: \xff\xfe\r\n", "host;x-amz-content-sha256;x-amz-date;x-amz-meta-a"),
        header_signed(now, "", "host;x-amz-content-sha256;x-amz-date;zzz-missing"),
        f"GET /s3/metaflow/x HTTP/1.1\r\nHost: {edge.host}\r\nConnection: close\r\n"
        "Authorization: AWS4-HMAC-SHA256\r\n\r\n".encode(),
        "GET /s3/metaflow/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
        "Authorization: AWS4-HMAC-SHA256 Credential=a/b, SignedHeaders=host, Signature=1\r\n\r\n".encode(),
        ("GET /s3/metaflow/x?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=metaflow-stack%2F20261399%2F"
         "us-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261399T999999Z&X-Amz-Expires=99999999999999999999999"
         "&X-Amz-SignedHeaders=host&X-Amz-Signature=00 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").encode(),
    ]


def test_malformed_signatures_get_a_4xx_never_a_traceback(edge: Edge) -> None:
    for raw in _malformed_sigv4(edge):
        with socket.create_connection(("127.0.0.1", edge.proxy.port), timeout=15) as sock:
            sock.sendall(raw)
            answer, _ = he.read_until_quiet(sock, 15, quiet=10)  # a refusal may come after a penalty
        status = he.statuses(answer)
        assert status and 400 <= status[0] < 500 and status[0] != 408, (raw, answer[:300])
        if status[0] == 403:
            assert b"<Code>AccessDenied</Code>" in answer or b"<Code>SignatureDoesNotMatch</Code>" in answer \
                or b"<Code>AuthorizationHeaderMalformed</Code>" in answer, answer
    time.sleep(0.5)
    for text in (edge.proxy.log_text(), edge.store.log_text()):
        assert "Traceback" not in text, text[text.find("Traceback") - 300:][:3000]


# ------------------------------------------------------------------------------------------------ the flood

def _bad_s3_headers(edge: Edge, i: int) -> dict[str, str]:
    wrong = Credentials("metaflow-stack", "0" * 64)
    return sign_headers("GET", "/s3/metaflow/data/readme.txt", "", edge.host, wrong, payload_hash=UNSIGNED_PAYLOAD)


async def _flood(edge: Edge, *, addresses: int, tunnel: bool, stop: threading.Event) -> Counter:
    """FLOOD_TASKS clients sending wrong credentials of every kind until `stop`; the statuses they got."""
    outcomes: Counter = Counter()
    bad_s3 = _bad_s3_headers(edge, 0)
    kinds = [("GET", "/api/flows", {"x-api-key": WRONG_KEY}),
             ("GET", "/service/flows", {"Cookie": f"{COOKIE_NAME}={'0' * 64}"}),
             ("GET", f"/?token={WRONG_KEY}", {}),
             ("GET", "/s3/metaflow/data/readme.txt", {"Host": edge.host, **bad_s3})]

    async def client(n: int) -> None:
        local = ("127.0.%d.%d" % (1 + n % addresses // 250, 2 + n % addresses % 250), 0) if addresses > 1 else None
        connector = aiohttp.TCPConnector(local_addr=local, force_close=False, limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            i = 0
            while not stop.is_set():
                method, target, headers = kinds[(n + i) % len(kinds)]
                headers = dict(headers)
                if tunnel:
                    headers["Cf-Connecting-Ip"] = f"10.{n % 250}.{i // 250 % 250}.{i % 250}"
                try:
                    async with session.request(method, edge.proxy.url + target, headers=headers,
                                               allow_redirects=False,
                                               timeout=aiohttp.ClientTimeout(total=30)) as response:
                        await response.read()
                        outcomes[response.status] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    outcomes[exc.__class__.__name__] += 1
                i += 1

    await asyncio.gather(*(client(n) for n in range(FLOOD_TASKS)))
    return outcomes


def _token_holder_requests(edge: Edge, tunnel: bool, stop: threading.Event) -> list[str]:
    """What token holders do while the flood goes on; one line per request that did not succeed."""
    failures: list[str] = []
    extra = {"Cf-Connecting-Ip": "192.0.2.10"} if tunnel else {}
    s3, internal = edge.s3(), edge.internal_s3()
    cookie = {COOKIE_NAME: cookie_value(edge.token)}
    rounds = 0
    with requests.Session() as session:
        while not stop.is_set() or rounds < 5:
            marker = f"valid-{rounds}"
            checks = [
                ("api key", lambda: session.get(f"{edge.proxy.url}/api/flows?m={marker}",
                                                headers={"x-api-key": edge.token, **extra}, timeout=30).status_code),
                ("service", lambda: session.post(f"{edge.proxy.url}/service/flows/F{rounds}?m={marker}", json={},
                                                 headers={"x-api-key": edge.token, **extra}, timeout=30).status_code),
                ("cookie", lambda: session.get(f"{edge.proxy.url}/api/runs?m={marker}", cookies=cookie,
                                               headers=extra, timeout=30).status_code),
                ("login", lambda: session.get(f"{edge.proxy.url}/?token={edge.token}", headers=extra,
                                              allow_redirects=False, timeout=30).status_code),
            ]
            for name, call in checks:
                status = call()
                if status not in (200, 303):
                    failures.append(f"{name}: {status}")
            try:
                assert s3.get_object(Bucket=BUCKET, Key="data/readme.txt")["Body"].read() == b"readme\n"
                s3.put_object(Bucket=BUCKET, Key=f"data/during-flood-{rounds}", Body=b"x")
                assert internal.get_object(Bucket=BUCKET, Key="data/readme.txt")["Body"].read() == b"readme\n"
            except (ClientError, AssertionError) as exc:
                failures.append(f"s3: {exc}")
            rounds += 1
    return failures + [f"only {rounds} rounds"] * (rounds < 5)


def _run_flood(edge: Edge, *, addresses: int, tunnel: bool) -> tuple[Counter, list[str]]:
    stop = threading.Event()
    result: dict[str, Counter] = {}
    flooder = threading.Thread(target=lambda: result.setdefault(
        "flood", asyncio.run(_flood(edge, addresses=addresses, tunnel=tunnel, stop=stop))))
    flooder.start()
    time.sleep(1.0)  # the budget is spent before the token holders start
    holders: list[str] = []
    timer = threading.Timer(FLOOD_S, stop.set)
    timer.start()
    try:
        holders = _token_holder_requests(edge, tunnel, stop)
    finally:
        stop.set()
        timer.cancel()
        flooder.join(60)
    return result["flood"], holders


@pytest.mark.parametrize("addresses", [1, 200], ids=["one-address", "many-addresses"])
def test_token_holders_keep_working_during_a_flood_of_wrong_credentials(edge: Edge, addresses: int) -> None:
    before = len(edge.recorder.seen)
    flood, failures = _run_flood(edge, addresses=addresses, tunnel=False)
    assert failures == [], failures
    refused_at_once = flood[429] + flood[503]
    assert refused_at_once > 0, f"the flood was never throttled: {flood}"
    assert set(flood) <= {200, 401, 403, 429, 503}, flood  # 200: the login page for a wrong ?token=
    reached = edge.recorder.seen[before:]
    assert reached and all(s.headers.get("x-api-key") is None and "valid-" in s.target for s in reached)
    assert all(WRONG_KEY not in s.target for s in reached)
    # After the flood, the same address still gets in at once with the token.
    response = requests.get(f"{edge.proxy.url}/api/after", headers={"x-api-key": edge.token}, timeout=10)
    assert response.status_code == 200


def test_behind_the_tunnel_rotating_visitor_addresses_lock_nobody_out(tunnel_edge: Edge) -> None:
    flood, failures = _run_flood(tunnel_edge, addresses=1, tunnel=True)
    assert failures == [], failures
    assert flood[429] + flood[503] > 0, flood
    assert set(flood) <= {200, 401, 403, 429, 503}, flood


def test_one_tunnel_visitor_cannot_take_every_connection(tunnel_edge: Edge) -> None:
    # 300 open connections from loopback (more than the 256 per address) are all accepted behind the tunnel.
    socks = [socket.create_connection(("127.0.0.1", tunnel_edge.proxy.port), timeout=5) for _ in range(300)]
    try:
        for sock in socks[-5:]:
            sock.sendall(he.request_bytes("GET", "/api/x", {"Host": "h", "x-api-key": tunnel_edge.token,
                                                            "Cf-Connecting-Ip": "192.0.2.77"}))
            answer, _ = he.read_until_quiet(sock, 5, quiet=0.5)
            assert he.statuses(answer) == [200]
    finally:
        for sock in socks:
            sock.close()


def test_1000_malformed_signatures_grow_the_log_by_a_bounded_amount(tunnel_edge: Edge) -> None:
    log = tunnel_edge.proxy.log
    probes = _malformed_sigv4(tunnel_edge)
    time.sleep(0.5)
    size_before = log.stat().st_size
    statuses: Counter = Counter()

    def send(worker: int) -> None:
        for i in range(125):
            raw = probes[i % len(probes)]
            raw = raw.replace(b"\r\n\r\n", f"\r\nCf-Connecting-Ip: 10.{worker}.{i}.9\r\n\r\n".encode(), 1)
            answer, _ = he.exchange(tunnel_edge.proxy.port, raw, timeout=15)
            for status in he.statuses(answer) or ["none"]:
                statuses[status] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    time.sleep(0.5)
    grown = log.stat().st_size - size_before
    print(f"\nlog bytes per 1,000 malformed SigV4 requests: {grown} (in {elapsed:.1f} s; {dict(statuses)})")
    assert sum(statuses.values()) == 1000 and set(statuses) <= {400, 403, 503}, statuses
    # At most a burst of 60 lines plus 2 a second, each within 240 characters (plus its time stamp).
    assert grown <= (60 + 2 * elapsed + 5) * 320, grown
    new_lines = log.read_bytes()[size_before:].decode(errors="replace").splitlines()
    assert new_lines and all(len(line) <= 320 for line in new_lines)
    assert "Traceback" not in log.read_text(errors="replace")
    answer = requests.get(f"{tunnel_edge.proxy.url}/api/x", headers={"x-api-key": tunnel_edge.token}, timeout=10)
    assert answer.status_code == 200


# ------------------------------------------------------------------------------------------------ token in targets

def test_a_token_in_the_query_never_reaches_the_backend_or_a_log(edge: Edge) -> None:
    token = edge.token
    before = len(edge.recorder.seen)
    encoded = f"%{ord(token[0]):02X}{token[1:]}"
    targets = [f"/api/flows?token={token}&keep=1", f"/service/flows?note={token}&keep=1",
               "/api/flows?keep=1&x-api-key=someone-elses-key&api_key=another", f"/api/flows?keep=1&n={encoded}"]
    for target in targets:
        status, _, _ = hp.raw_request(edge.proxy.port, "GET", target, {"x-api-key": token})
        assert status == 200, target
    status, _, _ = hp.raw_request(edge.proxy.port, "GET", f"/service/flows/{token}", {"x-api-key": token})
    assert status == 400
    reached = edge.recorder.seen[before:]
    assert [s.target for s in reached] == ["/api/flows?keep=1", "/flows?keep=1", "/api/flows?keep=1",
                                           "/api/flows?keep=1"]
    time.sleep(0.5)
    for log in (edge.proxy.log, edge.store.log):
        text = log.read_text(errors="replace")
        assert token not in text and "someone-elses-key" not in text


# ------------------------------------------------------------------------------------------------ names on disk

def _signed_raw(edge: Edge, method: str, path: str) -> bytes:
    headers = sign_headers(method, path, "", edge.host, Credentials("metaflow-stack", _s3_secret(edge)),
                           payload_hash=UNSIGNED_PAYLOAD)
    return he.request_bytes(method, path, {"Host": edge.host, "Connection": "close", **headers},
                            b"x" if method == "PUT" else b"")


@pytest.mark.parametrize("path", ["/s3/abc%0A", "/s3/abc%0A/key", "/s3/ABC", "/s3/a", "/s3/metaflow/data/a%0D%0Ab",
                                  "/s3/metaflow/data/a%0Ab", "/s3/metaflow/data/a%00b", "/s3/metaflow/data/a%1Bb"])
def test_bad_bucket_names_and_control_characters_in_keys_are_refused(edge: Edge, path: str) -> None:
    objects = edge.store.data_dir
    before = sorted(p.relative_to(objects) for p in objects.rglob("*"))
    answer, _ = he.exchange(edge.proxy.port, _signed_raw(edge, "PUT", path))
    assert he.statuses(answer)[:1] == [400], answer[:400]
    assert any(f"<Code>{code}</Code>".encode() in answer
               for code in ("InvalidBucketName", "InvalidArgument", "InvalidRequest")), answer
    assert sorted(p.relative_to(objects) for p in objects.rglob("*")) == before
    assert not any(ch in str(p) for p in objects.rglob("*") for ch in "\r\n\x00\x1b")


def test_boto3_keys_with_line_breaks_are_refused_and_ordinary_keys_work(edge: Edge) -> None:
    client = edge.s3()
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=BUCKET, Key="data/two\r\nlines", Body=b"x")
    assert refused.value.response["Error"]["Code"] == "InvalidArgument"
    client.put_object(Bucket=BUCKET, Key="data/ünïcode key (1).txt", Body=b"ok")
    assert client.get_object(Bucket=BUCKET, Key="data/ünïcode key (1).txt")["Body"].read() == b"ok"


# ------------------------------------------------------------------------------------------------ head deadline

def test_a_half_request_after_a_finished_one_is_closed_within_the_head_deadline(edge: Edge) -> None:
    key = {"Host": "h", "x-api-key": edge.token}
    half = b"GET /api/x HTTP/1.1\r\nHost: h\r\n"
    variants = [he.request_bytes("GET", "/api/a", key) + half,
                he.request_bytes("POST", "/service/b", key, b"{}") + half]
    socks = [socket.create_connection(("127.0.0.1", edge.proxy.port), timeout=5) for _ in variants]
    idle = socket.create_connection(("127.0.0.1", edge.proxy.port), timeout=5)
    try:
        started = time.monotonic()
        for sock, data in zip(socks, variants):
            sock.sendall(data)
        idle.sendall(he.request_bytes("GET", "/api/idle", key))
        answers = [he.read_until_quiet(sock, 30, quiet=25) for sock in socks]
        for answer, closed in answers:
            assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1 ") == 2 \
                and b"HTTP/1.1 408 Request Timeout" in answer and closed, answer
        assert time.monotonic() - started < 25
        # A kept-alive connection that finished its request without starting another is still served.
        first, _ = he.read_until_quiet(idle, 2, quiet=0.5)
        idle.sendall(he.request_bytes("GET", "/api/idle2", key))
        second, closed = he.read_until_quiet(idle, 5, quiet=1)
        assert he.statuses(first) == [200] and he.statuses(second) == [200] and not closed
    finally:
        for sock in (*socks, idle):
            sock.close()


# ------------------------------------------------------------------------------------------------ origins

def test_cookie_writes_need_an_origin_naming_scheme_host_and_port(edge: Edge) -> None:
    cookie = f"{COOKIE_NAME}={cookie_value(edge.token)}"
    origin = f"http://{edge.host}"
    cases = {
        "no origin": ({}, 403),
        "ftp scheme": ({"Origin": f"ftp://{edge.host}"}, 403),
        "https scheme": ({"Origin": f"https://{edge.host}"}, 403),
        "other port": ({"Origin": f"http://127.0.0.1:{edge.proxy.port + 1}"}, 403),
        "other host": ({"Origin": f"http://evil.example:{edge.proxy.port}"}, 403),
        "null": ({"Origin": "null"}, 403),
        "same origin": ({"Origin": origin}, 200),
        "same-origin referer": ({"Referer": f"{origin}/flows/x"}, 200),
        "cross-site referer": ({"Referer": f"http://evil.example/{edge.host}"}, 403),
    }
    before = len(edge.recorder.seen)
    for name, (headers, expected) in cases.items():
        status, _, _ = hp.raw_request(edge.proxy.port, "POST", f"/service/origin/{name.replace(' ', '-')}",
                                      {"Cookie": cookie, "Content-Type": "application/json", **headers}, b"{}")
        assert status == expected, name
    # An API client (x-api-key) sends no Origin and needs none.
    status, _, _ = hp.raw_request(edge.proxy.port, "POST", "/service/origin/api-key", {"x-api-key": edge.token},
                                  b"{}")
    assert status == 200
    reached = [s.target for s in edge.recorder.seen[before:]]
    assert reached == ["/origin/same-origin", "/origin/same-origin-referer", "/origin/api-key"]


# ------------------------------------------------------------------------------------------------ what a token grants

def test_the_ui_backend_environment_holds_only_what_it_needs(tmp_path: Path) -> None:
    """The UI backend runs code from artifacts (it unpickles them): its environment holds no token."""
    from installer import services
    from installer.runtime import Udocker
    from installer.settings import resolve

    settings = resolve({"root": str(tmp_path / "mf")}, environ={})
    token_file = settings.secrets_dir / "token"
    read_or_create_secret(token_file)
    token = read_secret(token_file)
    secrets = services.Secrets(db_password="db-password-" + "p" * 20, token_file=token_file,
                               s3_internal_file=settings.secrets_dir / "s3-internal", s3_internal="i" * 40)
    defined = services.define(settings, Udocker(tmp_path / "udocker", {}), secrets,
                              services.Hooks(lambda progress: None, lambda progress: None))
    ui = next(s for s in defined if s.name == "ui-backend")
    command = " ".join(ui.argv)
    files = "".join(ui.secret_files.values())
    assert token not in command and token not in files
    assert str(token_file) not in command
    assert not [arg for arg in ui.argv if arg.startswith("--volume=") and str(settings.secrets_dir) in arg]
    assert sorted(line.split("=", 1)[0] for line in files.splitlines()) == \
        ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MF_METADATA_DB_PSWD"]
    names = [arg.split("=", 2)[1] for arg in ui.argv if arg.startswith("--env=")]
    assert not [n for n in names if "TOKEN" in n or "AUTH_KEY" in n or "SECRET" in n], names
