"""The reverse proxy, run as a real `python -m installer.proxy` process in front of real servers.

Upstreams: the real metadata service of the shared stack (upstream v2.5.1 on PostgreSQL) for
/service, and a small aiohttp server of ours (tests/helpers_proxy.py) that records and echoes
what it receives, for /api; for the forwarding tests a second proxy sends /service to that echo
server too, so we can see exactly what an upstream receives. Flows are run by the real
`metaflow` client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets as pysecrets
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import requests

from installer import procs
from installer.errors import ConfigError
from installer.proxy import COOKIE_NAME, ProxyConfig, build_app, cookie_value
from installer.secrets import (
    read_or_create_secret,
    read_secret,
    rotate_secret,
    write_secret,
)

from . import helpers_proxy as hp


def client_ip() -> dict[str, str]:
    """A fresh client identity, as the tunnel names it (these proxies run with --behind-tunnel)."""
    return {"Cf-Connecting-Ip": f"10.{pysecrets.randbelow(256)}.{pysecrets.randbelow(256)}.{pysecrets.randbelow(256)}"}


# ------------------------------------------------------------------------------------------------
# fixtures: real servers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("proxy")


@pytest.fixture(scope="module")
def static_dir(workdir) -> Path:
    return hp.make_static_dir(workdir)


@pytest.fixture(scope="module")
def upstream(workdir):
    proc = hp.start_upstream(workdir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def metadata(shared_stack):
    """The shared stack's metadata service, reached directly (this module's proxies sit in front of it)."""
    return SimpleNamespace(url=f"http://127.0.0.1:{shared_stack['metadata_port']}")


@pytest.fixture(scope="module")
def proxy(workdir, metadata, upstream, static_dir):
    """The proxy as the stack runs it: /service -> metadata service, /api -> UI backend."""
    proc = hp.start_proxy(workdir, metadata_url=metadata.url, ui_url=upstream.url, static_dir=static_dir,
                          extra=["--behind-tunnel"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def echo_proxy(workdir, upstream, static_dir):
    """A proxy whose /service upstream is the echo server, to see what the metadata service would receive."""
    proc = hp.start_proxy(workdir, metadata_url=upstream.url, ui_url=upstream.url, static_dir=static_dir,
                          extra=["--behind-tunnel"])
    yield proc
    proc.stop()


@pytest.fixture()
def own_proxy(tmp_path, upstream, static_dir):
    """A proxy of its own, for tests that change its token."""
    proc = hp.start_proxy(tmp_path, metadata_url=upstream.url, ui_url=upstream.url, static_dir=static_dir,
                          extra=["--behind-tunnel"])
    yield proc
    proc.stop()


def session_cookie(proxy: hp.ProxyProcess) -> str:
    response = requests.get(f"{proxy.url}/?token={proxy.token}", allow_redirects=False)
    assert response.status_code == 303
    return response.cookies[COOKIE_NAME]


# ------------------------------------------------------------------------------------------------
# secrets
# ------------------------------------------------------------------------------------------------

def test_secret_is_created_0600_reused_and_rotated(tmp_path):
    path = tmp_path / "secrets" / "token"
    first = read_or_create_secret(path)
    assert len(first) >= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_or_create_secret(path) == first
    inode = path.stat().st_ino
    second = rotate_secret(path)
    assert second != first and read_secret(path) == second
    assert path.stat().st_ino != inode, "a rotation must replace the file, not rewrite it in place"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_secret(path, "a-database-password-0123456789")
    assert read_or_create_secret(path) == "a-database-password-0123456789"
    assert [p.name for p in path.parent.iterdir()] == ["token"], "no temporary file is left behind"


def test_secret_racing_creators_agree(tmp_path):
    path = tmp_path / "token"
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(read_or_create_secret(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1 and results[0] == read_secret(path)


def test_secret_rejects_bad_values_and_tightens_mode(tmp_path):
    path = tmp_path / "token"
    with pytest.raises(ConfigError):
        write_secret(path, "short")
    with pytest.raises(ConfigError):
        write_secret(path, "has a space in it 0123456789")
    path.write_text("loosened-by-hand-0123456789\n")
    path.chmod(0o644)
    assert read_secret(path) == "loosened-by-hand-0123456789"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("\n")
    with pytest.raises(ConfigError):
        read_or_create_secret(path)  # a broken file is reported, never silently replaced


def test_an_empty_secret_file_left_by_a_dead_runtime_is_replaced(tmp_path):
    """On Google Drive a file's name can reach Google without its content; the next runtime finds an
    empty token file. It holds nothing to keep, so `up` gets a new token instead of failing forever."""
    path = tmp_path / "token"
    path.touch()
    long_ago = time.time() - 60
    os.utime(path, (long_ago, long_ago))
    value = read_or_create_secret(path)
    assert len(value) >= 16 and read_secret(path) == value and read_or_create_secret(path) == value
    path.write_text("")  # just created: a writer may be about to fill it
    with pytest.raises(ConfigError):
        read_or_create_secret(path)


# ------------------------------------------------------------------------------------------------
# a real flow through the proxy
# ------------------------------------------------------------------------------------------------

FLOW = textwrap.dedent('''
    from metaflow import FlowSpec, step


    class ProxyTestFlow(FlowSpec):
        @step
        def start(self):
            self.numbers = [1, 2, 3]
            self.next(self.middle)

        @step
        def middle(self):
            self.total = sum(self.numbers) * 7
            self.next(self.end)

        @step
        def end(self):
            print("total is", self.total)


    if __name__ == "__main__":
        ProxyTestFlow()
''')

READ_BACK = textwrap.dedent('''
    import json, sys
    from metaflow import Flow, Run, namespace
    namespace(None)
    run = Run("ProxyTestFlow/" + sys.argv[1])
    task = run["middle"].task
    print(json.dumps({
        "latest": Flow("ProxyTestFlow").latest_run.id,
        "steps": sorted(step.id for step in run),
        "artifacts": sorted(artifact.id for artifact in task),
        "total": task["total"].data,
        "successful": run.successful,
    }))
''')


def flow_env(tmp_path: Path, proxy: hp.ProxyProcess, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
    env.update({
        "METAFLOW_DEFAULT_METADATA": "service",
        "METAFLOW_SERVICE_URL": f"{proxy.url}/service",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "datastore"),
        "HOME": str(tmp_path),
        "USERNAME": "proxy-tester",
    })
    if token is not None:
        env["METAFLOW_SERVICE_AUTH_KEY"] = token
    return env


def test_metaflow_flow_runs_through_the_proxy_and_reads_back(tmp_path, proxy):
    (tmp_path / "flow.py").write_text(FLOW)
    (tmp_path / "read_back.py").write_text(READ_BACK)
    env = flow_env(tmp_path, proxy, proxy.token)
    done = subprocess.run([sys.executable, "flow.py", "run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    run_id = re.search(r"Workflow starting \(run-id (\w+)\)", output).group(1)
    read = subprocess.run([sys.executable, "read_back.py", run_id], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert read.returncode == 0, read.stdout + read.stderr
    found = json.loads(read.stdout.strip().splitlines()[-1])
    assert found == {"latest": run_id, "steps": ["end", "middle", "start"],
                     "artifacts": ["name", "numbers", "total"], "total": 42, "successful": True}
    assert proxy.token not in proxy.log_text()


def test_metaflow_flow_without_key_gets_the_401_message(tmp_path, proxy):
    (tmp_path / "flow.py").write_text(FLOW)
    done = subprocess.run([sys.executable, "flow.py", "run"], cwd=tmp_path, env=flow_env(tmp_path, proxy, None),
                          capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "failed (code 401)" in output
    assert "send header x-api-key: <token> (METAFLOW_SERVICE_AUTH_KEY)" in output
    assert "Workflow starting" not in output


def test_metaflow_flow_with_wrong_key_is_refused(tmp_path, proxy):
    (tmp_path / "flow.py").write_text(FLOW)
    env = flow_env(tmp_path, proxy, "not-the-token-" + "x" * 30)
    done = subprocess.run([sys.executable, "flow.py", "run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode != 0 and "failed (code 401)" in done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------
# access control
# ------------------------------------------------------------------------------------------------

PROTECTED = ["/", "/index.html", "/static/js/main.4d5e6f.js", "/HelloFlow/12/start/3", "/api/flows",
             "/api/ping", "/service/ping", "/service/flows/HelloFlow/runs"]


@pytest.mark.parametrize("path", PROTECTED)
def test_every_route_refuses_missing_and_wrong_token(proxy, path):
    for headers in ({}, {"x-api-key": "wrong-" + "a" * 40}, {"Cookie": f"{COOKIE_NAME}={'0' * 64}"},
                    {"x-api-key": ""}):
        response = requests.get(proxy.url + path, headers={**headers, **client_ip()})
        assert response.status_code == 401, (path, headers)
        body = response.json()
        assert body["how_to_authenticate"] == ("send header x-api-key: <token> (METAFLOW_SERVICE_AUTH_KEY) "
                                               "or open /?token=<token> in a browser")
        assert "index" not in response.text and "pong" not in response.text
    for method in ("POST", "PATCH", "PUT", "DELETE"):
        response = requests.request(method, proxy.url + path, data=b"{}", headers=client_ip())
        assert response.status_code == 401


@pytest.mark.parametrize("path", PROTECTED)
def test_every_route_admits_the_key(proxy, path):
    response = requests.get(proxy.url + path, headers={"x-api-key": proxy.token})
    assert response.status_code == 200, (path, response.text[:200])


def test_browser_without_token_gets_login_page(proxy):
    response = requests.get(proxy.url + "/HelloFlow/12", headers={"Accept": "text/html,*/*", **client_ip()})
    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("text/html")
    assert '<form method="get" action="/"' in response.text and 'name="token"' in response.text
    assert "Fixture UI" not in response.text
    # API paths stay JSON even for a browser.
    api = requests.get(proxy.url + "/api/flows", headers={"Accept": "text/html", **client_ip()})
    assert api.status_code == 401 and api.json()["error"]


def test_healthz_needs_no_credentials_and_reveals_nothing(proxy):
    response = requests.get(proxy.url + "/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok", "ui": "ready"}
    assert "Set-Cookie" not in response.headers


def test_cookie_flow(proxy):
    response = requests.get(f"{proxy.url}/HelloFlow/7?token={proxy.token}&tab=logs", allow_redirects=False)
    assert response.status_code == 303
    assert response.headers["Location"] == "/HelloFlow/7?tab=logs"
    set_cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie and "Path=/" in set_cookie
    assert "Secure" not in set_cookie
    value = response.cookies[COOKIE_NAME]
    assert value == cookie_value(proxy.token) and proxy.token not in set_cookie
    cookies = {COOKIE_NAME: value}
    index = requests.get(proxy.url + "/HelloFlow/7?tab=logs", cookies=cookies)
    assert index.status_code == 200 and "Fixture UI index" in index.text
    assert requests.get(proxy.url + "/api/flows", cookies=cookies).status_code == 200
    assert requests.get(proxy.url + "/static/js/main.4d5e6f.js", cookies=cookies).status_code == 200
    # Behind https (the tunnel) the cookie is Secure.
    secure = requests.get(f"{proxy.url}/?token={proxy.token}", allow_redirects=False,
                          headers={"X-Forwarded-Proto": "https", **client_ip()})
    assert "Secure" in secure.headers["Set-Cookie"]


def test_wrong_token_in_url_shows_login_with_error(proxy):
    response = requests.get(f"{proxy.url}/?token=guess-{'b' * 40}", allow_redirects=False,
                            headers={"Accept": "text/html", **client_ip()})
    assert response.status_code == 401 and "not valid" in response.text
    assert "Set-Cookie" not in response.headers


def test_token_redirect_never_leaves_the_site(proxy):
    status, headers, _ = hp.raw_request(proxy.port, "GET", f"//evil.example/x?token={proxy.token}")
    assert status == 303 and headers["location"] == "/"
    status, headers, _ = hp.raw_request(proxy.port, "GET", f"/\\evil.example/?token={proxy.token}")
    assert status == 303 and headers["location"] == "/"


def test_rotating_the_token_invalidates_cookie_and_key(own_proxy):
    old_token = own_proxy.token
    cookies = {COOKIE_NAME: session_cookie(own_proxy)}
    assert requests.get(own_proxy.url + "/api/x", cookies=cookies).status_code == 200
    new_token = rotate_secret(own_proxy.token_file)
    assert requests.get(own_proxy.url + "/api/x", cookies=cookies, headers=client_ip()).status_code == 401
    assert requests.get(own_proxy.url + "/api/x", headers={"x-api-key": old_token, **client_ip()}).status_code == 401
    assert requests.get(own_proxy.url + "/api/x", headers={"x-api-key": new_token}).status_code == 200
    assert requests.get(own_proxy.url + "/api/x", cookies={COOKIE_NAME: session_cookie(own_proxy)}).status_code == 200


def test_missing_token_file_denies_everyone(own_proxy):
    token = own_proxy.token
    own_proxy.token_file.unlink()
    response = requests.get(own_proxy.url + "/api/x", headers={"x-api-key": token, **client_ip()})
    assert response.status_code == 401
    write_secret(own_proxy.token_file, token)
    assert requests.get(own_proxy.url + "/api/x", headers={"x-api-key": token}).status_code == 200


def test_cookie_cannot_authorise_cross_origin_writes(echo_proxy):
    cookies = {COOKIE_NAME: session_cookie(echo_proxy)}
    hostile = requests.post(echo_proxy.url + "/service/flows/X/run", cookies=cookies, json={},
                            headers={"Origin": "https://evil.trycloudflare.com"})
    assert hostile.status_code == 403
    same = requests.post(echo_proxy.url + "/service/flows/X/run", cookies=cookies, json={},
                         headers={"Origin": echo_proxy.url})
    assert same.status_code == 200


def test_failures_are_delayed_without_blocking_others(proxy):
    attacker = client_ip()
    for _ in range(8):
        requests.get(proxy.url + "/api/x", headers={"x-api-key": "bad-" + "c" * 40, **attacker})
    finished: list[str] = []

    def failing() -> None:
        requests.get(proxy.url + "/api/x", headers={"x-api-key": "bad-" + "c" * 40, **attacker})
        finished.append("attacker")

    thread = threading.Thread(target=failing)
    thread.start()
    time.sleep(0.1)  # let the failing request reach the proxy first
    response = requests.get(proxy.url + "/api/x", headers={"x-api-key": proxy.token})
    finished.append("legitimate")
    thread.join()
    assert response.status_code == 200
    assert finished == ["legitimate", "attacker"], "the penalty must delay only the failing client"


def test_no_auth_is_refused_on_a_public_address(tmp_path, static_dir, upstream):
    done = subprocess.run([sys.executable, "-m", "installer.proxy", "--listen-host", "0.0.0.0", "--listen-port",
                           str(hp.free_port()), "--metadata-url", upstream.url, "--ui-backend-url", upstream.url,
                           "--static-dir", str(static_dir), "--no-auth"],
                          cwd=hp.REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "refusing to serve without access control on 0.0.0.0" in done.stderr
    config = ProxyConfig("0.0.0.0", 1, upstream.url, upstream.url, static_dir, tmp_path / "t", no_auth=True)
    with pytest.raises(ConfigError):
        build_app(config)


def test_no_auth_on_loopback_serves_openly_and_warns(tmp_path, static_dir, upstream):
    proxy = hp.start_proxy(tmp_path, metadata_url=upstream.url, ui_url=upstream.url, static_dir=static_dir,
                           extra=["--no-auth"])
    try:
        assert requests.get(proxy.url + "/service/ping").text == "pong"
        assert "Fixture UI index" in requests.get(proxy.url + "/").text
        assert "ACCESS CONTROL IS OFF" in proxy.log_text()
    finally:
        proxy.stop()


# ------------------------------------------------------------------------------------------------
# websockets
# ------------------------------------------------------------------------------------------------

async def _ws_attempt(url: str, **kwargs) -> int:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, **kwargs):
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


def test_websocket_without_credentials_is_refused(proxy):
    url = proxy.url.replace("http", "ws") + "/api/ws"
    assert asyncio.run(_ws_attempt(url, headers=client_ip())) == 401
    assert asyncio.run(_ws_attempt(url, headers={"Cookie": f"{COOKIE_NAME}={'f' * 64}", **client_ip()})) == 401
    assert asyncio.run(_ws_attempt(url, headers={"x-api-key": "nope-" + "d" * 40, **client_ip()})) == 401
    assert asyncio.run(_ws_attempt(url + f"?token={proxy.token}", headers=client_ip())) == 401


def test_websocket_cookie_from_another_origin_is_refused(proxy):
    url = proxy.url.replace("http", "ws") + "/api/ws"
    cookie = {"Cookie": f"{COOKIE_NAME}={session_cookie(proxy)}"}
    assert asyncio.run(_ws_attempt(url, headers={**cookie, "Origin": "https://evil.example"})) == 403
    assert asyncio.run(_ws_attempt(url, headers={**cookie, "Origin": proxy.url})) == 101


def test_websocket_relays_both_ways_and_propagates_close(proxy, upstream):
    url = proxy.url.replace("http", "ws") + "/api/ws"
    cookie = session_cookie(proxy)

    async def scenario() -> dict:
        seen: dict = {}
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, headers={"Cookie": f"{COOKIE_NAME}={cookie}; theme=dark",
                                                        "Origin": proxy.url},
                                          protocols=("fixture-v1",)) as ws:
                seen["protocol"] = ws.protocol
                seen["hello"] = await ws.receive_json(timeout=10)
                await ws.send_str("ping-text")
                seen["text"] = (await ws.receive(timeout=10)).data
                await ws.send_bytes(b"\x01\x02\x03")
                seen["binary"] = (await ws.receive(timeout=10)).data
                await ws.send_str("close:4001")
                message = await ws.receive(timeout=10)
                seen["closed_by_upstream"] = (message.type.name, ws.close_code)
            async with session.ws_connect(url, headers={"x-api-key": proxy.token}) as ws:
                await ws.receive_json(timeout=10)
                await ws.close(code=4002)
        return seen

    seen = asyncio.run(scenario())
    assert seen["protocol"] == "fixture-v1"
    headers = seen["hello"]["headers"]
    assert "x-api-key" not in headers
    assert headers.get("cookie") == "theme=dark", "the session cookie must not reach the UI backend"
    assert headers["x-forwarded-for"].endswith("127.0.0.1")
    assert seen["text"] == "echo:ping-text"
    assert seen["binary"] == b"\x03\x02\x01"
    assert seen["closed_by_upstream"] == ("CLOSE", 4001)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        closes = requests.get(upstream.url + "/api/stats").json()["ws_closes"]
        if 4002 in closes:
            break
        time.sleep(0.1)
    assert 4002 in closes, f"the client's close code never reached the upstream: {closes}"


# ------------------------------------------------------------------------------------------------
# forwarding
# ------------------------------------------------------------------------------------------------

def test_forwarding_strips_credentials_and_hop_by_hop_and_sets_forwarded(echo_proxy):
    cookie = session_cookie(echo_proxy)
    status, headers, body = hp.raw_request(echo_proxy.port, "PATCH", "/service/flows/F/runs/1/tag/mutate?x=1&y=%2F", headers={
        "x-api-key": echo_proxy.token,
        "Cookie": f"a=1; {COOKIE_NAME}={cookie}; b=2",
        "Connection": "keep-alive, X-Private-Hop",
        "X-Private-Hop": "secret-hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "X-Forwarded-For": "203.0.113.9",
        "X-Custom": "kept",
    }, body=b'{"tags_to_add": ["a"]}')
    assert status == 200, body
    seen = json.loads(body)
    names = {k.lower(): v for k, v in seen["headers"]}
    assert seen["method"] == "PATCH"
    assert seen["raw_path"] == "/flows/F/runs/1/tag/mutate?x=1&y=%2F", "the /service prefix is stripped"
    assert "x-api-key" not in names
    for hop in ("x-private-hop", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert hop not in names, hop
    assert names["cookie"] == "a=1; b=2"
    assert names["x-forwarded-for"] == "127.0.0.1", "a client's own X-Forwarded-For is not passed on"
    assert names["x-forwarded-proto"] == "http"
    assert names["x-forwarded-host"] == f"127.0.0.1:{echo_proxy.port}"
    assert names["x-custom"] == "kept"
    assert seen["bytes"] == len(b'{"tags_to_add": ["a"]}')
    assert headers["x-upstream"] == "fixture" and "set-cookie" not in headers, "upstream cookies are dropped"
    assert echo_proxy.token not in body.decode()


def test_absolute_form_target_is_refused(echo_proxy):
    status, _, body = hp.raw_request(echo_proxy.port, "GET", "http://evil.example/service/ping",
                                     headers={"x-api-key": echo_proxy.token})
    assert status == 400 and b"pong" not in body


def test_api_keeps_its_prefix(echo_proxy):
    seen = requests.get(echo_proxy.url + "/api/flows/HelloFlow/runs?_limit=5",
                        headers={"x-api-key": echo_proxy.token}).json()
    assert seen["raw_path"] == "/api/flows/HelloFlow/runs?_limit=5"


def test_upstream_down_gives_502_naming_the_service(tmp_path, static_dir):
    dead_metadata, dead_ui = hp.free_port(), hp.free_port()
    proxy = hp.start_proxy(tmp_path, metadata_url=f"http://127.0.0.1:{dead_metadata}",
                           ui_url=f"http://127.0.0.1:{dead_ui}", static_dir=static_dir)
    try:
        key = {"x-api-key": proxy.token}
        response = requests.get(proxy.url + "/service/flows", headers=key)
        assert response.status_code == 502
        assert response.json() == {"error": f"metadata service is not answering on 127.0.0.1:{dead_metadata}"}
        response = requests.post(proxy.url + "/api/x", headers=key, data=b"abc")
        assert response.status_code == 502
        assert response.json() == {"error": f"UI backend is not answering on 127.0.0.1:{dead_ui}"}
        assert asyncio.run(_ws_attempt(proxy.url.replace("http", "ws") + "/api/ws", headers=key)) == 502
        health = requests.get(proxy.url + "/healthz")
        assert health.status_code == 503 and health.json() == {"status": "degraded", "ui": "starting"}
        assert "Fixture UI index" in requests.get(proxy.url + "/", headers=key).text, "the UI files still serve"
    finally:
        proxy.stop()


def test_a_browser_gets_a_self_reloading_page_while_the_ui_backend_starts(tmp_path, static_dir, upstream):
    """Flows are tracked as soon as the metadata service answers; the UI page waits for its backend."""
    ui_port = hp.free_port()
    proxy = hp.start_proxy(tmp_path, metadata_url=upstream.url, ui_url=f"http://127.0.0.1:{ui_port}",
                           static_dir=static_dir)
    late_ui = None
    try:
        health = requests.get(proxy.url + "/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok", "ui": "starting"}
        key = {"x-api-key": proxy.token}
        assert requests.get(proxy.url + "/service/ping", headers=key).text == "pong"
        page = requests.get(proxy.url + "/FanoutFlow/3", headers={**key, "Accept": "text/html"})
        assert page.status_code == 503 and page.headers["Retry-After"] == "2"
        assert '<meta http-equiv="refresh" content="2">' in page.text
        assert "The Metaflow UI is starting" in page.text and "Fixture UI index" not in page.text
        assert page.headers["Cache-Control"] == "no-store"
        # Assets and API clients are not sent the page: only browser navigations are.
        assert requests.get(proxy.url + "/static/js/main.4d5e6f.js", headers=key).status_code == 200

        late_ui = hp.start_upstream(tmp_path, port=ui_port)
        deadline = time.monotonic() + 10
        while requests.get(proxy.url + "/healthz").json()["ui"] != "ready":
            assert time.monotonic() < deadline, "the proxy never noticed the UI backend"
            time.sleep(0.2)
        page = requests.get(proxy.url + "/FanoutFlow/3", headers={**key, "Accept": "text/html"})
        assert page.status_code == 200 and "Fixture UI index" in page.text
    finally:
        proxy.stop()
        if late_ui is not None:
            late_ui.stop()


def test_response_is_streamed_not_buffered(proxy, upstream):
    response = requests.get(proxy.url + "/api/stream", headers={"x-api-key": proxy.token}, stream=True,
                            timeout=20)
    lines = response.iter_lines()
    # The upstream holds back its second chunk until released: a buffering proxy would hang here.
    assert next(lines) == b"first-chunk"
    requests.post(upstream.url + "/api/release")
    assert next(lines) == b"second-chunk"


def _clear_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_upload_is_streamed_without_buffering(echo_proxy):
    size = 50 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)
    requests.get(echo_proxy.url + "/service/warm-up", headers={"x-api-key": echo_proxy.token})
    _clear_peak(echo_proxy.pid)
    before = echo_proxy.rss_kib()

    def body():
        for _ in range(size // len(block)):
            yield block

    for kind, data in (("chunked", body()), ("content-length", b"".join(body()))):
        response = requests.post(echo_proxy.url + "/service/upload", data=data,
                                 headers={"x-api-key": echo_proxy.token}, timeout=120)
        assert response.status_code == 200, kind
        seen = response.json()
        assert seen["bytes"] == size and seen["sha256"] == digest.hexdigest(), kind
    growth_kib = _peak_kib(echo_proxy.pid) - before
    assert growth_kib < 16 * 1024, f"proxy RSS peaked {growth_kib} KiB above its start: the body was buffered"


def test_large_download_is_streamed_without_buffering(proxy):
    size = 50 * 1024 * 1024
    _clear_peak(proxy.pid)
    before = proxy.rss_kib()
    response = requests.get(proxy.url + f"/api/big?bytes={size}", headers={"x-api-key": proxy.token},
                            stream=True, timeout=120)
    received = sum(len(chunk) for chunk in response.iter_content(65536))
    assert received == size
    growth_kib = _peak_kib(proxy.pid) - before
    assert growth_kib < 16 * 1024, f"proxy RSS peaked {growth_kib} KiB above its start: the body was buffered"


def test_client_disconnect_cancels_the_upstream_request(proxy, upstream):
    start = requests.get(upstream.url + "/api/stats").json()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(proxy.url + "/api/hold", headers={"x-api-key": proxy.token}, timeout=1.5)
    deadline = time.monotonic() + 15
    stats = start
    while time.monotonic() < deadline:
        stats = requests.get(upstream.url + "/api/stats").json()
        if stats["cancelled"] > start["cancelled"]:
            break
        time.sleep(0.1)
    assert stats["held"] > start["held"]
    assert stats["cancelled"] > start["cancelled"], "the upstream request outlived the client"


def test_oversized_headers_are_refused_not_fatal(proxy):
    huge = {"X-Huge": "h" * 100_000, "x-api-key": proxy.token}
    status, _, _ = hp.raw_request(proxy.port, "GET", "/api/x", headers=huge)
    assert status in (400, 431)
    many = {f"X-Many-{i}": "v" for i in range(300)}
    status, _, _ = hp.raw_request(proxy.port, "GET", "/api/x", headers={**many, "x-api-key": proxy.token})
    assert status in (400, 431)
    status, _, _ = hp.raw_request(proxy.port, "GET", "/api/" + "p" * 100_000, headers={"x-api-key": proxy.token})
    assert status in (400, 414, 431)
    assert procs.alive(proxy.pid)
    assert requests.get(proxy.url + "/api/x", headers={"x-api-key": proxy.token}).status_code == 200


# ------------------------------------------------------------------------------------------------
# static files
# ------------------------------------------------------------------------------------------------

def test_static_files_cache_headers_and_fallback(proxy):
    key = {"x-api-key": proxy.token}
    index = requests.get(proxy.url + "/", headers=key)
    assert index.status_code == 200 and index.headers["Cache-Control"] == "no-cache"
    asset = requests.get(proxy.url + "/static/js/main.4d5e6f.js", headers=key)
    assert asset.status_code == 200 and "fixtureLoaded" in asset.text
    assert asset.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    route = requests.get(proxy.url + "/HelloFlow/1234/start/5?direction=asc", headers=key)
    assert route.status_code == 200 and "Fixture UI index" in route.text
    assert route.headers["Cache-Control"] == "no-cache"
    assert requests.get(proxy.url + "/static/js/missing.js", headers=key).status_code == 404
    assert requests.get(proxy.url + "/favicon.ico", headers=key).status_code == 404
    head = requests.head(proxy.url + "/static/css/main.1a2b3c.css", headers=key)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len("body { background: #fafafa; }\n"))
    assert requests.post(proxy.url + "/", headers=key).status_code == 405


def test_the_web_app_manifest_loads_without_credentials_and_nothing_else_does(proxy, static_dir):
    # Browsers fetch <link rel="manifest"> without cookies: every page load used to log a 401 for it.
    (static_dir / "manifest.json").write_text('{"name": "Metaflow UI"}\n')
    try:
        manifest = requests.get(proxy.url + "/manifest.json")
        assert manifest.status_code == 200 and manifest.json() == {"name": "Metaflow UI"}
        assert requests.head(proxy.url + "/manifest.json").status_code == 200
        assert requests.get(proxy.url + "/favicon.ico").status_code == 404  # public, and absent here
        assert requests.post(proxy.url + "/manifest.json").status_code == 401
        for private in ("/", "/index.html", "/static/js/main.4d5e6f.js", "/HelloFlow/1", "/manifest.json/x"):
            assert requests.get(proxy.url + private).status_code == 401, private
    finally:
        (static_dir / "manifest.json").unlink()


def test_static_path_traversal_is_impossible(proxy, workdir):
    key = {"x-api-key": proxy.token}
    secret = workdir / "outside-secret.txt"
    targets = [
        "/../outside-secret.txt",
        "/static/../../outside-secret.txt",
        "/%2e%2e/outside-secret.txt",
        "/%2E%2E/%2e%2e/outside-secret.txt",
        "/static/%2e%2e/%2e%2e/outside-secret.txt",
        "/..%2foutside-secret.txt",
        "/static%2f..%2f..%2foutside-secret.txt",
        "/%2e%2e%2foutside-secret.txt",
        "/..%5coutside-secret.txt",
        "/static/..\\..\\outside-secret.txt",
        "/.%2e/outside-secret.txt",
        "/%252e%252e/outside-secret.txt",
        str(secret),
        "/" + str(secret),
        "/static/escape.txt",
        "/static/escape-dir/outside-secret.txt",
        "/static/escape-dir/ui/index.html",
        "/%00/outside-secret.txt",
        "/etc/passwd",
        "/../../../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    ]
    for target in targets:
        status, _, body = hp.raw_request(proxy.port, "GET", target, headers=key)
        assert b"OUTSIDE-THE-BUNDLE" not in body, target
        assert b"root:" not in body, target
        assert status in (200, 400, 404), (target, status)
        if status == 200:
            assert b"Fixture UI index" in body, target  # only ever the UI's own index.html
    assert procs.alive(proxy.pid)


# ------------------------------------------------------------------------------------------------
# logging
# ------------------------------------------------------------------------------------------------

def test_token_never_appears_in_the_log(proxy):
    token = proxy.token
    wrong = "wrong-token-" + "e" * 30
    requests.get(f"{proxy.url}/?token={token}", allow_redirects=False)
    requests.get(f"{proxy.url}/HelloFlow?x=1&token={token}", allow_redirects=False)
    requests.get(f"{proxy.url}/?token={wrong}", headers=client_ip())
    requests.get(f"{proxy.url}/api/x?token={token}", headers={"x-api-key": token})
    requests.get(f"{proxy.url}/service/ping", headers={"x-api-key": token})
    requests.get(f"{proxy.url}/service/ping", headers={"x-api-key": wrong, **client_ip()})
    requests.get(f"{proxy.url}/api/x", cookies={COOKIE_NAME: cookie_value(token)})
    hp.raw_request(proxy.port, "GET", f"/api/x?token={token}", headers={"X-Huge": "h" * 100_000, "x-api-key": token})
    time.sleep(0.2)  # the access log line is written after the response
    text = proxy.log_text()
    assert "token=REDACTED" in text, "the requests above must have been logged"
    assert token not in text and wrong not in text
    assert cookie_value(token) not in text


def test_secret_created_where_hard_links_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Google Drive's FUSE folder refuses hard links: the secret is still created, once, 0600."""
    import errno as _errno

    from installer import secrets as secrets_module

    def no_links(src: object, dst: object) -> None:
        raise OSError(_errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(secrets_module.os, "link", no_links)
    path = tmp_path / "drive" / "secrets" / "token"
    first = secrets_module.read_or_create_secret(path)
    assert secrets_module.read_or_create_secret(path) == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["token"]
