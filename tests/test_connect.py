"""`connect` and the connection string, against the real stack (the shared one: its entry point, the
upstream metadata service, its object store) and against the real entry point in front of servers
that misbehave, with the real Metaflow client running a real flow."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web

from installer import clientconfig as connect_mod
from installer.clientconfig import (
    ConnectionRefused,
    ConnectResult,
    ConnectTimedOut,
    NameNotResolved,
    NotAStack,
    ProfileError,
    ServiceDown,
    ServiceTooOld,
    StackUnreachable,
    TLSFailed,
    WrongToken,
    connect,
)
from installer.connection import (
    BadConnectionString,
    format_connection,
    parse_connection,
    read_connection_file,
    write_connection_file,
)
from installer.errors import ConnectError, StackError

import installer

from . import helpers_proxy as hp
from .helpers_connect import LoopThread, OtherServer, SilentServer, free_port

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tok_3kR9-x_Yq2"


@pytest.fixture(autouse=True)
def clean_metaflow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own Metaflow config folder and leaves os.environ as it found it."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("METAFLOW_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("METAFLOW_HOME", str(tmp_path / "mfconfig"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for key in ("SUDO_USER", "USERNAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("USER", "tester")  # a user name Metaflow accepts; see the no-user test
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def stack(shared_stack: dict) -> SimpleNamespace:
    """The shared stack as a client sees it: its address, its token, its entry point's log."""
    settings = installer.settings(**shared_stack)
    return SimpleNamespace(url=f"http://127.0.0.1:{settings.port}", port=settings.port,
                           token=installer.token(**shared_stack), proxy_log=settings.log_path("proxy"))


def real_proxy(workdir: Path, metadata_url: str) -> hp.ProxyProcess:
    """The stack's own entry point (`python -m installer.proxy`) in front of the given metadata service."""
    return hp.start_proxy(workdir, metadata_url=metadata_url, ui_url=f"http://127.0.0.1:{free_port()}",
                          static_dir=hp.make_static_dir(workdir))


# ---------------------------------------------------------------- the connection string

def test_connection_string_is_the_browser_login_url_and_round_trips() -> None:
    line = format_connection("https://amber-basin.trycloudflare.com/", TOKEN)
    assert line == f"https://amber-basin.trycloudflare.com/?token={TOKEN}"
    assert parse_connection(line) == ("https://amber-basin.trycloudflare.com", TOKEN)


@pytest.mark.parametrize("pasted", [
    f"  https://amber-basin.trycloudflare.com/?token={TOKEN}\n",
    f"'https://amber-basin.trycloudflare.com/?token={TOKEN}'",
    f'"https://amber-basin.trycloudflare.com?token={TOKEN}"',
    f"HTTPS://amber-basin.trycloudflare.com/?token={TOKEN}#",
])
def test_pasted_variants_are_cleaned(pasted: str) -> None:
    assert parse_connection(pasted) == ("https://amber-basin.trycloudflare.com", TOKEN)


def test_token_with_reserved_characters_survives_round_trip() -> None:
    odd = "a+b/c=d&e f"
    assert parse_connection(format_connection("http://127.0.0.1:7860", odd)) == ("http://127.0.0.1:7860", odd)


@pytest.mark.parametrize(("text", "phrase"), [
    ("", "empty"),
    ("amber-basin.trycloudflare.com/?token=x", "no http:// or https://"),
    ("ftp://amber-basin.trycloudflare.com/?token=x", "unsupported URL scheme 'ftp'"),
    ("https:///?token=x", "names no host"),
    ("https://amber-basin.trycloudflare.com/", "no access token"),
    ("https://amber-basin.trycloudflare.com/?token=", "no access token"),
    ("https://amber-basin.trycloudflare.com:99999/?token=x", "not a valid URL"),
    ("https://amber basin.trycloudflare.com/?token=x", "spaces"),
])
def test_bad_connection_strings_say_what_is_wrong(text: str, phrase: str) -> None:
    with pytest.raises(BadConnectionString) as caught:
        parse_connection(text)
    assert phrase in caught.value.message
    assert caught.value.reason == "bad_url"
    assert caught.value.hint


def test_connection_file_is_private_atomic_and_complete(tmp_path: Path) -> None:
    path = write_connection_file(tmp_path, "https://amber-basin.trycloudflare.com/", TOKEN, {"tunnel": True})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = read_connection_file(tmp_path)
    assert record is not None
    assert record["url"] == "https://amber-basin.trycloudflare.com"
    assert record["token"] == TOKEN
    assert record["connection_string"] == f"https://amber-basin.trycloudflare.com/?token={TOKEN}"
    assert record["service_url"] == "https://amber-basin.trycloudflare.com/service"
    assert record["tunnel"] is True
    assert record["updated_at"].endswith("Z")
    assert [p.name for p in tmp_path.iterdir()] == ["connection.json"]  # no temporary file left behind
    assert read_connection_file(tmp_path / "elsewhere") is None


# ---------------------------------------------------------------- success paths

def test_connect_writes_default_profile_and_environment(stack: SimpleNamespace, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "ada")
    result = connect(format_connection(stack.url, stack.token))
    assert isinstance(result, ConnectResult)
    assert result.base_url == stack.url
    assert result.service_version == "2.5.1"  # the upstream service's own answer
    config = tmp_path / "mfconfig" / "config.json"
    assert result.config_path == config and result.config_action == "created"
    written = json.loads(config.read_text())
    client_params = json.loads(written.pop("METAFLOW_DATATOOLS_CLIENT_PARAMS"))
    assert written == {
        "METAFLOW_DEFAULT_METADATA": "service",
        "METAFLOW_SERVICE_URL": f"{stack.url}/service",
        "METAFLOW_SERVICE_AUTH_KEY": stack.token,
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": "s3://metaflow/data",
        "METAFLOW_S3_ENDPOINT_URL": f"{stack.url}/s3",
        "METAFLOW_CLIENT_CACHE_PATH": str(tmp_path / "cache" / "metaflow_client"),
    }
    assert stat.S_IMODE((tmp_path / "cache" / "metaflow_client").stat().st_mode) == 0o700
    assert any("this user's own" in note for note in result.notes)
    assert client_params["aws_access_key_id"] == "metaflow-stack" and client_params["aws_secret_access_key"]
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert os.environ["METAFLOW_SERVICE_URL"] == f"{stack.url}/service"
    assert os.environ["METAFLOW_SERVICE_AUTH_KEY"] == stack.token
    assert result.datastore.kind == "s3" and result.datastore.ui_misses == ()
    text = "\n".join(result.lines())
    assert stack.token not in text and stack.token not in repr(result)
    assert client_params["aws_secret_access_key"] not in text
    assert connect(format_connection(stack.url, stack.token)).config_action == "unchanged"


def test_a_client_cache_chosen_by_the_user_is_kept(stack: SimpleNamespace, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "mfconfig" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"METAFLOW_CLIENT_CACHE_PATH": "/data/mf-cache"}))
    result = connect(format_connection(stack.url, stack.token), set_env=False)
    assert json.loads(config.read_text())["METAFLOW_CLIENT_CACHE_PATH"] == "/data/mf-cache"
    assert result.kept_keys == () and not any("caches artifacts" in note for note in result.notes)

    monkeypatch.setenv("METAFLOW_CLIENT_CACHE_PATH", "/elsewhere")  # set in the environment: left to it
    config.unlink()
    connect(format_connection(stack.url, stack.token), set_env=False)
    assert "METAFLOW_CLIENT_CACHE_PATH" not in json.loads(config.read_text())
    assert not (tmp_path / "cache").exists()


def test_the_local_datastore_stays_an_explicit_choice(stack: SimpleNamespace, tmp_path: Path) -> None:
    result = connect(format_connection(stack.url, stack.token), set_env=False, datastore="local",
                     datastore_root=tmp_path / "runs")
    written = json.loads((tmp_path / "mfconfig" / "config.json").read_text())
    assert written["METAFLOW_DEFAULT_DATASTORE"] == "local"
    assert written["METAFLOW_DATASTORE_SYSROOT_LOCAL"] == str((tmp_path / "runs").resolve())
    assert "METAFLOW_S3_ENDPOINT_URL" not in written
    assert result.datastore.kind == "local"
    assert set(result.datastore.ui_misses) == {"logs", "artifacts", "cards"}
    assert "NOT their logs, artifacts or cards" in result.datastore.statement


def test_existing_profile_is_merged_and_the_result_says_so(stack: SimpleNamespace, tmp_path: Path) -> None:
    config = tmp_path / "mfconfig" / "config_gpu.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"METAFLOW_SERVICE_URL": "http://old-host:8080",
                                  "METAFLOW_SERVICE_AUTH_KEY": "old-secret-value",
                                  "METAFLOW_DEFAULT_METADATA": "service",
                                  "METAFLOW_USER": "ada"}))
    result = connect(url=stack.url + "/", token=stack.token, profile="gpu", set_env=False)
    assert result.config_path == config and result.config_action == "updated"
    assert result.replaced == {"METAFLOW_SERVICE_URL": "http://old-host:8080",
                               "METAFLOW_SERVICE_AUTH_KEY": "old-..."}
    assert result.kept_keys == ("METAFLOW_USER",)
    written = json.loads(config.read_text())
    assert written["METAFLOW_USER"] == "ada"
    assert written["METAFLOW_SERVICE_URL"] == f"{stack.url}/service"
    assert "METAFLOW_SERVICE_URL" not in os.environ
    assert any("METAFLOW_PROFILE=gpu" in note for note in result.notes)
    assert not (tmp_path / "mfconfig" / "config.json").exists()


@pytest.mark.parametrize("user", [None, "", "root"])
def test_a_shell_without_a_user_name_gets_one_in_the_profile(stack: SimpleNamespace, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             user: str | None) -> None:
    if user is None:
        monkeypatch.delenv("USER")
    else:
        monkeypatch.setenv("USER", user)
    monkeypatch.delenv("LOGNAME", raising=False)
    result = connect(format_connection(stack.url, stack.token), set_env=False)
    written = json.loads((tmp_path / "mfconfig" / "config.json").read_text())
    # Tests run as root, whose name Metaflow refuses: a neutral name is written instead.
    assert written["METAFLOW_USER"] == connect_mod.FALLBACK_USER == "notebook"
    assert any("runs are recorded as user 'notebook' (METAFLOW_USER in the profile)" in n for n in result.notes)

    # A user name already in the profile is the user's choice: kept.
    (tmp_path / "mfconfig" / "config.json").write_text(json.dumps({"METAFLOW_USER": "ada"}))
    again = connect(format_connection(stack.url, stack.token), set_env=False)
    assert json.loads((tmp_path / "mfconfig" / "config.json").read_text())["METAFLOW_USER"] == "ada"
    assert not any("METAFLOW_USER" in n for n in again.notes)


def test_unreadable_profile_is_not_overwritten(stack: SimpleNamespace, tmp_path: Path) -> None:
    config = tmp_path / "mfconfig" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text("{not json")
    with pytest.raises(ProfileError) as caught:
        connect(format_connection(stack.url, stack.token))
    assert str(config) in caught.value.message
    assert config.read_text() == "{not json"


def test_environment_only_writes_no_file(stack: SimpleNamespace, tmp_path: Path) -> None:
    result = connect(format_connection(stack.url, stack.token), write_profile=False)
    assert result.config_path is None and result.config_action == "not written"
    assert not (tmp_path / "mfconfig").exists()
    assert os.environ["METAFLOW_DEFAULT_METADATA"] == "service"


def test_connect_finds_connection_json_in_a_shared_root(stack: SimpleNamespace, tmp_path: Path) -> None:
    root = tmp_path / "drive" / "metaflow-stack"
    write_connection_file(root, stack.url, stack.token)
    result = connect(root=root, set_env=False, write_profile=False)
    assert result.base_url == stack.url
    with pytest.raises(BadConnectionString) as caught:
        connect(root=tmp_path / "empty", set_env=False, write_profile=False)
    assert "connection.json" in caught.value.message


# ---------------------------------------------------------------- each failure, its own message

def _fail(connection: str, timeout: float = 5.0) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        connect(connection, set_env=False, write_profile=False, timeout=timeout)
    error = caught.value
    assert isinstance(error, StackError) and error.hint
    return error


def test_failure_bad_url() -> None:
    error = _fail(f"htp//127.0.0.1:7860/?token={TOKEN}")
    assert isinstance(error, BadConnectionString) and error.reason == "bad_url"


def test_failure_dns() -> None:
    error = _fail(f"http://nonexistent.invalid/?token={TOKEN}")
    assert isinstance(error, NameNotResolved) and error.reason == "dns"
    assert "cannot resolve the host name 'nonexistent.invalid'" in error.message


def test_failure_tls_to_a_plain_http_port(stack: SimpleNamespace) -> None:
    error = _fail(f"https://127.0.0.1:{stack.port}/?token={TOKEN}")
    assert isinstance(error, TLSFailed) and error.reason == "tls"
    assert "TLS handshake" in error.message and "http://" in (error.hint or "")


def test_failure_tls_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = OtherServer(200)
    server.ssl_context = context
    server.start()
    try:
        error = _fail(f"https://127.0.0.1:{server.port}/?token={TOKEN}")
    finally:
        server.stop()
    assert isinstance(error, TLSFailed) and error.reason == "tls"
    assert "certificate verify failed" in error.message


def test_failure_timeout() -> None:
    silent = SilentServer()
    try:
        error = _fail(f"http://127.0.0.1:{silent.port}/?token={TOKEN}", timeout=1.0)
    finally:
        silent.stop()
    assert isinstance(error, ConnectTimedOut) and error.reason == "timeout"
    assert "did not answer within 1 s" in error.message


def test_failure_refused() -> None:
    error = _fail(f"http://127.0.0.1:{free_port()}/?token={TOKEN}")
    assert isinstance(error, ConnectionRefused) and error.reason == "refused"
    assert "refused" in error.message


def test_failure_wrong_token(stack: SimpleNamespace) -> None:
    error = _fail(format_connection(stack.url, "not-the-token"))
    assert isinstance(error, WrongToken) and error.reason == "unauthorized"
    assert "refused the access token (HTTP 401)" in error.message
    assert "missing or invalid access token" in error.message  # the proxy's own words are passed on


def test_failure_stack_up_service_down(tmp_path: Path) -> None:
    proxy = real_proxy(tmp_path, f"http://127.0.0.1:{free_port()}")
    try:
        error = _fail(format_connection(proxy.url, proxy.token))
    finally:
        proxy.stop()
    assert isinstance(error, ServiceDown) and error.reason == "service_down"
    assert "metadata service is not answering (HTTP 502)" in error.message


@pytest.mark.parametrize("status", [200, 404])
def test_failure_not_a_metaflow_stack(status: int) -> None:
    other = OtherServer(status)
    other.start()
    try:
        error = _fail(f"http://127.0.0.1:{other.port}/?token={TOKEN}")
    finally:
        other.stop()
    assert isinstance(error, NotAStack) and error.reason == "not_a_stack"
    assert f"GET /healthz gave HTTP {status} (text/html)" in error.message


def test_failure_edge_answers_but_stack_does_not() -> None:
    edge = OtherServer(502)  # what a tunnel's edge answers when its origin is gone
    edge.start()
    try:
        error = _fail(f"http://127.0.0.1:{edge.port}/?token={TOKEN}")
    finally:
        edge.stop()
    assert isinstance(error, StackUnreachable) and error.reason == "stack_unreachable"


def test_failure_redirect_names_the_address_to_use() -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("https://amber-basin.trycloudflare.com" + request.path)

    app = web.Application()
    app.router.add_get("/{tail:.*}", moved)
    server = LoopThread(app)
    server.start()
    try:
        error = _fail(f"http://127.0.0.1:{server.port}/?token={TOKEN}")
    finally:
        server.stop()
    assert isinstance(error, connect_mod.Redirected) and error.reason == "redirect"
    assert error.hint == "use https://amber-basin.trycloudflare.com in the connection string"


def test_failure_service_too_old(tmp_path: Path) -> None:
    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong", headers={"METADATA_SERVICE_VERSION": "2.0.5"})

    app = web.Application()
    app.router.add_get("/ping", ping)
    old = LoopThread(app)
    old.start()
    proxy = real_proxy(tmp_path, f"http://127.0.0.1:{old.port}")
    try:
        error = _fail(format_connection(proxy.url, proxy.token))
    finally:
        proxy.stop()
        old.stop()
    assert isinstance(error, ServiceTooOld) and error.reason == "service_version"
    assert "'2.0.5'" in error.message and "2.3.0 or newer" in error.message


def test_every_failure_has_its_own_reason() -> None:
    reasons = [cls.reason for cls in (BadConnectionString, NameNotResolved, TLSFailed, ConnectTimedOut,
                                      ConnectionRefused, WrongToken, ServiceDown, NotAStack, StackUnreachable,
                                      ServiceTooOld, ProfileError, connect_mod.Unreachable,
                                      connect_mod.Redirected)]
    assert len(set(reasons)) == len(reasons)


# ---------------------------------------------------------------- end to end

FLOW = textwrap.dedent('''
    from metaflow import FlowSpec, step


    class HelloStackFlow(FlowSpec):
        @step
        def start(self):
            self.message = "hello from a remote notebook"
            self.next(self.end)

        @step
        def end(self):
            print(self.message)


    if __name__ == "__main__":
        HelloStackFlow()
''')

CONNECT = textwrap.dedent('''
    import json, sys
    from installer.clientconfig import connect
    result = connect(sys.argv[1], set_env=False)
    print(json.dumps({"config": str(result.config_path), "lines": result.lines()}))
''')

STACK_SIDE = textwrap.dedent('''
    import json
    from metaflow import Flow, namespace
    namespace(None)
    run = Flow("HelloStackFlow").latest_run
    print(json.dumps({
        "pathspec": run.pathspec,
        "finished": run.finished,
        "successful": run.successful,
        "steps": sorted(step.id for step in run),
        "tasks": sum(1 for step in run for _ in step),
    }))
''')


def _clean_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "USER": "remote-tester", "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO)}


def test_remote_process_connects_and_runs_a_flow_seen_by_the_stack(stack: SimpleNamespace, tmp_path: Path) -> None:
    remote_home = tmp_path / "remote-home"
    env = _clean_env(remote_home)
    work = tmp_path / "remote-work"
    work.mkdir()
    (work / "flow.py").write_text(FLOW)
    line = format_connection(stack.url, stack.token)

    done = subprocess.run([sys.executable, "-c", CONNECT, line], env=env, cwd=work, capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["config"] == str(remote_home / ".metaflowconfig" / "config.json")

    seen_before = stack.proxy_log.read_text()
    run = subprocess.run([sys.executable, "flow.py", "run"], env=env, cwd=work, capture_output=True,
                         text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "hello from a remote notebook" in run.stdout + run.stderr
    # The run's records went through the entry point, authenticated by the token.
    logged = stack.proxy_log.read_text()[len(seen_before):]
    assert '"POST /service/flows/HelloStackFlow' in logged, logged[-3000:]

    # Read back from another folder with only the profile `connect` wrote: records from the stack's
    # metadata service, data from its object store.
    seen = subprocess.run([sys.executable, "-c", STACK_SIDE], env=env, cwd=tmp_path, capture_output=True,
                          text=True, check=False, timeout=120)
    assert seen.returncode == 0, seen.stderr
    result = json.loads(seen.stdout.strip().splitlines()[-1])
    assert result["pathspec"].startswith("HelloStackFlow/")
    assert result["finished"] is True
    assert result["successful"] is True
    assert result["steps"] == ["end", "start"]
    assert result["tasks"] == 2
