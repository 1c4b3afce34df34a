"""The tunnel manager, against tests/fake_cloudflared.py (Cloudflare cannot be reached from here).

The fake behaves like cloudflared: INF lines and the boxed banner on stderr,
`/quicktunnel` on its metrics address, exit codes. A trycloudflare.com address
cannot resolve here, so tests that need the reachability check to succeed run
the fake in forwarding mode: it relays to the --url origin from a loopback port
and announces that address (http://127.0.0.1:<port>), and they pass the matching
`url_pattern`; the check through the announced address is then end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from installer import procs
from installer.connection import read_connection_file
from installer.errors import TunnelError
from installer.settings import Settings, resolve
from installer.tunnel import (
    CLOUDFLARED_RELEASE,
    CloudflaredRelease,
    ensure_tunnel,
    find_cloudflared,
    find_url,
    machine_arch,
    read_tunnel_state,
    start_tunnel,
    stop_recorded_tunnel,
    stop_tunnel,
    tunnel_alive,
)

from . import helpers_proxy as hp
from .helpers_connect import ServeBytes, free_port

FAKE = Path(__file__).resolve().parent / "fake_cloudflared.py"
LOOPBACK = r"http://127\.0\.0\.1:\d+"
TOKEN = "tunnel-token-123"


@pytest.fixture()
def origin(tmp_path: Path) -> Iterator[hp.ProxyProcess]:
    """The stack's entry point, the real `python -m installer.proxy`, in front of a small HTTP server
    that answers the metadata service's /ping (the tunnel checks the entry point's /healthz only)."""
    backend = hp.start_upstream(tmp_path)
    proxy = hp.start_proxy(tmp_path, metadata_url=backend.url, ui_url=backend.url,
                           static_dir=hp.make_static_dir(tmp_path))
    yield proxy
    proxy.stop()
    backend.stop()


@pytest.fixture()
def settings(tmp_path: Path, origin: hp.ProxyProcess) -> Settings:
    return resolve({"root": str(tmp_path / "root"), "port": origin.port}, environ={})


@pytest.fixture()
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each fake start appends what it announced here."""
    path = tmp_path / "announced.jsonl"
    monkeypatch.setenv("FAKE_CLOUDFLARED_RECORD", str(path))
    for name in list(os.environ):
        if name.startswith("FAKE_CLOUDFLARED_") and name != "FAKE_CLOUDFLARED_RECORD":
            monkeypatch.delenv(name)
    monkeypatch.delenv("MF_CLOUDFLARED", raising=False)
    return path


@pytest.fixture(autouse=True)
def no_stray_fakes() -> Iterator[None]:
    yield
    strays = [p for p in procs.all_processes() if str(FAKE) in p.command]
    procs.kill_tree([p.pid for p in strays])
    assert not strays, f"a fake cloudflared was left running: {[p.command for p in strays]}"


def announced(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fakes_running() -> list[procs.ProcInfo]:
    return [p for p in procs.all_processes() if str(FAKE) in p.command]


# ---------------------------------------------------------------- discovery and the reachability gate

def test_banner_url_is_discovered_and_the_stack_answers_through_it(settings: Settings, record: Path,
                                                                   origin: hp.ProxyProcess,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_FORWARD", "1")
    info = start_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_pattern=LOOPBACK, url_timeout=30)
    try:
        [start] = announced(record)
        assert info.url == start["url"]
        assert info.url != origin.url  # the address is the fake's relay, not the origin itself
        assert start["argv"] == ["tunnel", "--no-autoupdate", "--url", f"http://127.0.0.1:{settings.port}",
                                 "--metrics", info.metrics]
        assert tunnel_alive(info)
        assert requests.get(f"{info.url}/healthz", timeout=5).json() == {"status": "ok", "ui": "ready"}
        assert info.log == settings.log_path("tunnel")
        assert "Your quick Tunnel has been created" in info.log.read_text()
        connection = read_connection_file(settings.root)
        assert connection is not None
        assert connection["url"] == info.url and connection["tunnel"] is True
        assert connection["connection_string"] == f"{info.url}/?token={TOKEN}"
        assert read_tunnel_state(settings) == info
    finally:
        stop_tunnel(info)
    assert not tunnel_alive(info)
    assert "graceful shutdown" in info.log.read_text()


def test_the_address_is_not_asked_for_before_cloudflared_reaches_the_edge(
        settings: Settings, record: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_FORWARD", "1")
    monkeypatch.setenv("FAKE_CLOUDFLARED_READY_DELAY", "1.5")
    info = start_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_pattern=LOOPBACK, url_timeout=30)
    stop_tunnel(info)
    lines = info.log.read_text().splitlines()
    ready = next(i for i, line in enumerate(lines) if "edge connection ready" in line)
    relayed = next(i for i, line in enumerate(lines) if "relayed GET /healthz" in line)
    assert ready < relayed


def test_real_quick_tunnel_address_from_the_banner_is_not_reported_until_reachable(
        settings: Settings, record: Path) -> None:
    with pytest.raises(TunnelError) as caught:
        start_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_timeout=30, reach_timeout=2)
    [start] = announced(record)
    assert start["url"].endswith(".trycloudflare.com")
    assert f"did not answer through the tunnel {start['url']}/healthz" in caught.value.message
    assert read_connection_file(settings.root) is None
    assert read_tunnel_state(settings) is None
    assert not fakes_running()


def test_url_is_discovered_from_the_metrics_endpoint(settings: Settings, record: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_BANNER", "0")
    with pytest.raises(TunnelError) as caught:
        start_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_timeout=30, reach_timeout=2)
    [start] = announced(record)
    assert start["url"] not in settings.log_path("tunnel").read_text()  # only /quicktunnel knew it
    assert f"through the tunnel {start['url']}/healthz" in caught.value.message


def test_no_url_times_out_with_the_log_tail(settings: Settings, record: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_NO_URL", "1")
    with pytest.raises(TunnelError) as caught:
        start_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_timeout=2)
    error = caught.value
    assert "reported no public URL within 2 s" in error.message
    assert "/quicktunnel" in error.message
    assert "Requesting new quick Tunnel on trycloudflare.com" in (error.log_tail or "")
    assert "Requesting new quick Tunnel" in str(error) and error.hint
    assert error.log == settings.log_path("tunnel")
    assert not fakes_running()


def test_immediate_exit_is_reported_with_its_code_and_log(settings: Settings, record: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_FAIL", "1")
    with pytest.raises(TunnelError) as caught:
        start_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_timeout=30)
    assert "cloudflared exited with code 1 before it reported a public URL" in caught.value.message
    assert "no such host" in (caught.value.log_tail or "")


def test_a_tunnel_without_a_token_is_refused(settings: Settings) -> None:
    with pytest.raises(TunnelError) as caught:
        start_tunnel(settings, token="", cloudflared=FAKE)
    assert "without an access token" in caught.value.message


# ---------------------------------------------------------------- monitor: crash, restart, new URL

def test_crash_restart_reports_a_new_url_and_rewrites_connection_json(settings: Settings, record: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_FORWARD", "1")
    monkeypatch.setenv("FAKE_CLOUDFLARED_CRASH_AFTER", "1")
    first = start_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_pattern=LOOPBACK, url_timeout=30)
    monkeypatch.delenv("FAKE_CLOUDFLARED_CRASH_AFTER")
    deadline = time.monotonic() + 30
    while tunnel_alive(first) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tunnel_alive(first)
    assert "no more connections active and exiting" in first.log.read_text()

    check = ensure_tunnel(settings, token=TOKEN)  # what a monitor loop calls, from the state on disk
    try:
        assert check.action == "restarted"
        assert check.previous_url == first.url
        assert check.url_changed and check.info.url != first.url
        assert [a["url"] for a in announced(record)] == [first.url, check.info.url]
        assert check.info.pid != first.pid and tunnel_alive(check.info)
        connection = read_connection_file(settings.root)
        assert connection is not None and connection["url"] == check.info.url
        assert connection["connection_string"] == f"{check.info.url}/?token={TOKEN}"
        assert read_tunnel_state(settings) == check.info
        assert requests.get(f"{check.info.url}/healthz", timeout=5).status_code == 200

        again = ensure_tunnel(settings, token=TOKEN)
        assert again.action == "kept" and again.info == check.info and not again.url_changed
    finally:
        assert stop_recorded_tunnel(settings) is True
    assert not tunnel_alive(check.info)
    assert stop_recorded_tunnel(settings) is False


def test_ensure_starts_a_tunnel_when_none_was_recorded(settings: Settings, record: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_FORWARD", "1")
    check = ensure_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_pattern=LOOPBACK)
    try:
        assert check.action == "started" and check.previous_url is None
    finally:
        stop_tunnel(check.info)


def test_starting_again_replaces_the_running_tunnel(settings: Settings, record: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_FORWARD", "1")
    first = start_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_pattern=LOOPBACK)
    second = start_tunnel(settings, token=TOKEN, cloudflared=FAKE, url_pattern=LOOPBACK)
    try:
        assert not tunnel_alive(first) and tunnel_alive(second)
        assert [p.pid for p in fakes_running()] == [second.pid]
    finally:
        stop_tunnel(second)


def test_find_url_matches_only_quick_tunnel_addresses() -> None:
    line = "2026-01-01T00:00:00Z INF |  https://amber-basin-cedar-delta.trycloudflare.com   |"
    assert find_url(line) == "https://amber-basin-cedar-delta.trycloudflare.com"
    assert find_url("INF Visit https://developers.cloudflare.com/cloudflare-one/ for docs") is None
    assert find_url("INF Requesting new quick Tunnel on trycloudflare.com...") is None
    assert find_url('ERR failed to request quick Tunnel: Post "https://api.trycloudflare.com/tunnel"') is None


# ---------------------------------------------------------------- obtaining the binary

def _release(url_template: str, digest: str) -> CloudflaredRelease:
    return CloudflaredRelease(version="2026.9.3", sha256={machine_arch(): digest}, url_template=url_template)


def test_download_failure_names_the_way_out(tmp_path: Path) -> None:
    release = _release(f"http://127.0.0.1:{free_port()}/{{version}}/cloudflared-linux-{{arch}}", "0" * 64)
    with pytest.raises(TunnelError) as caught:
        find_cloudflared(tmp_path, release=release)
    assert "cannot download cloudflared from http://127.0.0.1:" in caught.value.message
    assert "--cloudflared PATH" in (caught.value.hint or "") and "--cloudflared PATH" in str(caught.value)
    assert not list((tmp_path / "bin").iterdir())


def test_checksum_mismatch_discards_the_download(tmp_path: Path) -> None:
    mirror = ServeBytes(b"#!/bin/sh\necho not cloudflared\n")
    mirror.start()
    try:
        release = _release(f"http://127.0.0.1:{mirror.port}/{{version}}/cloudflared-linux-{{arch}}",
                           CLOUDFLARED_RELEASE.sha256["amd64"])
        with pytest.raises(TunnelError) as caught:
            find_cloudflared(tmp_path, release=release)
    finally:
        mirror.stop()
    assert mirror.hits == [f"/2026.9.3/cloudflared-linux-{machine_arch()}"]
    assert "checksum mismatch" in caught.value.message
    assert "--cloudflared PATH" in (caught.value.hint or "")
    assert not list((tmp_path / "bin").iterdir())


def test_verified_download_is_cached_and_rechecked(tmp_path: Path) -> None:
    payload = FAKE.read_bytes()
    mirror = ServeBytes(payload)
    mirror.start()
    try:
        release = _release(f"http://127.0.0.1:{mirror.port}/{{version}}/cloudflared-linux-{{arch}}",
                           hashlib.sha256(payload).hexdigest())
        path = find_cloudflared(tmp_path, release=release)
        assert path == tmp_path / "bin" / f"cloudflared-2026.9.3-{machine_arch()}"
        assert path.read_bytes() == payload and stat.S_IMODE(path.stat().st_mode) == 0o755
        assert find_cloudflared(tmp_path, release=release) == path
        assert len(mirror.hits) == 1  # served from the cache the second time
        path.write_bytes(payload[:100])  # a damaged cache is fetched again, not run
        assert find_cloudflared(tmp_path, release=release).read_bytes() == payload
        assert len(mirror.hits) == 2
    finally:
        mirror.stop()


def test_explicit_binary_from_flag_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_cloudflared(tmp_path, FAKE) == FAKE
    monkeypatch.setenv("MF_CLOUDFLARED", str(FAKE))
    assert find_cloudflared(tmp_path) == FAKE
    monkeypatch.setenv("MF_CLOUDFLARED", str(tmp_path / "missing"))
    with pytest.raises(TunnelError) as caught:
        find_cloudflared(tmp_path)
    assert "cloudflared not found at" in caught.value.message
    plain = tmp_path / "cloudflared"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(TunnelError) as caught:
        find_cloudflared(tmp_path, plain)
    assert "is not executable" in caught.value.message


def test_pinned_release_covers_both_architectures() -> None:
    assert set(CLOUDFLARED_RELEASE.sha256) == {"amd64", "arm64"}
    for digest in CLOUDFLARED_RELEASE.sha256.values():
        assert len(digest) == 64 and int(digest, 16) >= 0
    url = CLOUDFLARED_RELEASE.url_template.format(version=CLOUDFLARED_RELEASE.version, arch="amd64")
    assert url == "https://github.com/cloudflare/cloudflared/releases/download/2026.9.3/cloudflared-linux-amd64"
