"""Pulls that get through: registries tried in order, Docker Hub's 429, credentials, progress.

The registries are tests/registry_front.py in front of the real local registry: bearer
tokens, Docker Hub's 429 after N manifest GETs, mirrors that hold some tags and not others
or another image under a tag, a slow link. The images land in a real udocker.
"""

from __future__ import annotations

import base64
import io
import os
import re
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import installer
from installer import notebook as nb
from installer import pulls, runtime
from installer.errors import ImageError
from installer.output import Printer
from installer.registry import Credentials
from installer.stack import Event
from installer.transfer import SETTLE_SECONDS, Meter, Transfer
from tests.conftest import PRODUCTION_IMAGES, REPO, free_port, stack_flags
from tests.registry_front import Behaviour, running

PG, SVC = PRODUCTION_IMAGES["postgres"], PRODUCTION_IMAGES["service"]
PG_REPO, PG_TAG = "library/" + PG.split(":")[0], PG.split(":")[1]
SVC_REPO, SVC_TAG = SVC.split(":")[0], SVC.split(":")[1]
SVC_NAME = SVC_REPO.split("/")[1]


def fresh_udocker(tmp_path: Path) -> runtime.Udocker:
    return runtime.prepare(tmp_path / "udocker", tmp_path / "bin", lambda _: None)


def manifest_gets(front) -> int:
    return sum(1 for method, path in front.requests if method == "GET" and "/manifests/" in path)


def test_each_image_comes_from_the_next_registry_that_has_it(tmp_path: Path, registry: str) -> None:
    hub = Behaviour(upstream=registry, anonymous_pulls=0)  # the limit is used up: every manifest GET gets 429
    # A mirror that serves another image under the postgres tag, and has no service image.
    impostor = Behaviour(upstream=registry, tags={f"{PG_REPO}:{PG_TAG}"}, paths={PG_REPO: SVC_REPO},
                         retag={PG_TAG: SVC_TAG})
    partial = Behaviour(upstream=registry, tags={f"{PG_REPO}:{PG_TAG}"})  # PostgreSQL only
    # Like public.ecr.aws/outerbounds: the service image under another namespace.
    renamed = Behaviour(upstream=registry, tags={f"outer/{SVC_NAME}:{SVC_TAG}"}, paths={f"outer/{SVC_NAME}": SVC_REPO})
    udocker = fresh_udocker(tmp_path)
    lines: list[str] = []
    with running(hub) as h, running(impostor) as i, running(partial) as p, running(renamed) as r:
        mirrors = [h.url, i.url, p.url, f"{r.url}/outer"]
        found = udocker.pull_all([PG, SVC], None, lines.append, mirrors=mirrors)

    assert [item.source.label for item in found] == [p.url, f"{r.url}/outer"]
    pg, svc = found
    assert len(pg.tried) == 2 and pg.tried[0] == f"{h.url}: pull limit reached (HTTP 429)"
    assert pg.tried[1].startswith(f"{i.url}: serves another image under {PG_TAG}")
    assert pg.check.startswith(f"same digest as {h.url} (sha256:")
    assert svc.tried == (f"{h.url}: pull limit reached (HTTP 429)", f"{i.url}: no such tag", f"{p.url}: no such tag")
    assert svc.check.startswith(f"same digest as {h.url}")
    # Docker Hub was asked by HEAD (not counted) and one GET per image (refused); nothing else.
    assert manifest_gets(h) == 2
    assert {path for m, path in h.requests if m == "HEAD"} == {f"/v2/{PG_REPO}/manifests/{PG_TAG}",
                                                               f"/v2/{SVC_REPO}/manifests/{SVC_TAG}"}
    assert not [path for _, path in h.requests if "/blobs/" in path]

    # Both images are in udocker, under the names udocker lists; each shared layer was fetched once.
    listed = udocker.run("images", what="udocker images").split()
    assert PG in listed and SVC in listed
    blob_gets = [path for front in (p, r) for m, path in front.requests if m == "GET" and "/blobs/" in path]
    digests = [path.rsplit("/", 1)[1] for path in blob_gets]
    assert len(digests) == len(set(digests)) == len({b.digest for item in found for b in item.manifest.blobs})
    # The progress: byte counts against the total of every layer, ending at 100%.
    transfers = [line for line in lines if isinstance(line, Transfer)]
    total = sum(b.size for b in {b.digest: b for item in found for b in item.manifest.blobs}.values())
    assert transfers and transfers[-1].finished and transfers[-1].done == transfers[-1].total == total
    assert f"found {PG} from {p.url} (after {h.url}: pull limit reached (HTTP 429)" in "\n".join(lines)
    assert not list((tmp_path / "udocker" / "layers").glob(".*.part"))

    # Creating a container shows its unpacking the same way, against the layers' unpacked size.
    lines.clear()
    assert udocker.ensure_container(PG, "probe", lines.append)
    unpacking = [line for line in lines if isinstance(line, Transfer)]
    assert unpacking and all(t.what == "unpacking" and t.total > 2 * pg.manifest.size for t in unpacking)
    assert unpacking[-1].finished and unpacking[-1].done == unpacking[-1].total
    assert [t.done for t in unpacking] == sorted(t.done for t in unpacking)


def test_a_429_everywhere_says_what_happened_what_was_tried_and_what_to_do(tmp_path: Path, registry: str) -> None:
    hub = Behaviour(upstream=registry, anonymous_pulls=0)
    empty = Behaviour(upstream=registry, tags=set())
    udocker = fresh_udocker(tmp_path)
    with running(hub) as h, running(empty) as e, pytest.raises(ImageError) as caught:
        udocker.pull_all([PG], None, lambda _: None, mirrors=[h.url, e.url])
    error = caught.value
    assert error.message.startswith(f"could not pull {PG}: 127.0.0.1:{h.server_address[1]} refused it with HTTP 429 "
                                     "(too many requests)")
    assert "counted per IP address" in error.message
    tail = error.log_tail.splitlines()
    assert tail[:2] == [f"tried {h.url}: pull limit reached (HTTP 429)", f"tried {e.url}: no such tag"]
    assert ("TOOMANYREQUESTS: You have reached your unauthenticated pull rate limit. "
            "https://www.docker.com/increase-rate-limit") in tail[2]
    for words in ("MF_REGISTRY_USER and MF_REGISTRY_PASSWORD", "--registry-auth-file", "resets in up to 6 h 00 min",
                  "--mirrors (MF_MIRRORS)", "bash scripts/offline_up.sh"):
        assert words in error.hint, words
    assert not udocker.has_image(PG)
    layers = tmp_path / "udocker" / "layers"
    assert not layers.exists() or not any(layers.iterdir())  # nothing was downloaded


def test_a_mirror_is_trusted_as_is_only_when_the_first_registry_cannot_be_asked(registry: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with running(Behaviour(upstream=registry)) as mirror:
        sources = [pulls.parse_source(dead), pulls.parse_source(mirror.url)]
        found = pulls.locate(PG, PG_REPO, PG_TAG, sources, None)
    assert found.source.url == mirror.url and found.tried == (f"{dead}: {dead} did not answer (connection refused)",)
    assert found.check.startswith("digest sha256:") and f"not compared: {dead} could not be asked" in found.check


def test_wrong_credentials_are_refused_without_showing_them(registry: str) -> None:
    password = secrets.token_urlsafe(12)
    private = Behaviour(upstream=registry, login_required=True, users={"team": password})
    with running(private) as front:
        with pytest.raises(ImageError) as caught:
            pulls.locate(PG, PG_REPO, PG_TAG, [pulls.parse_source(front.url)], Credentials("team", "wrong"))
        assert "refused the login of team" in str(caught.value) and "wrong" not in str(caught.value)
        assert "MF_REGISTRY_USER / MF_REGISTRY_PASSWORD" in caught.value.hint
        with pytest.raises(ImageError) as anonymous:
            pulls.locate(PG, PG_REPO, PG_TAG, [pulls.parse_source(front.url)], None)
        assert "it wants credentials" in str(anonymous.value)
        found = pulls.locate(PG, PG_REPO, PG_TAG, [pulls.parse_source(front.url)], Credentials("team", password))
    assert found.source.url == front.url and password not in repr(found)


def test_credentials_file_and_half_given_credentials(tmp_path: Path) -> None:
    path = tmp_path / "auth"
    path.write_text("team:s3cret:with-colon\n")
    assert pulls.read_credentials(None, None, path) == Credentials("team", "s3cret:with-colon")
    assert pulls.read_credentials("u", "p", path) == Credentials("u", "p")
    path.write_text("no colon here\n")
    with pytest.raises(Exception, match="does not hold `user:password`"):
        pulls.read_credentials(None, None, path)
    with pytest.raises(Exception, match="go together"):
        pulls.read_credentials("u", None, None)


def _scan_command_lines(secret: str, found: list[str], stop: threading.Event) -> None:
    while not stop.is_set():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    text = (entry / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if secret in text:
                    found.append(text.replace("\0", " "))
        stop.wait(0.05)


def test_up_logs_in_pulls_through_a_slow_link_and_keeps_the_credentials_out_of_everything(
        tmp_path: Path, registry: str) -> None:
    """The real `up` from the command line: Docker Hub's anonymous limit is used up, the given account gets through."""
    password = "pw-" + secrets.token_hex(12)
    hub = Behaviour(upstream=registry, anonymous_pulls=0, users={"mfuser": password}, rate=30e6)
    spare = Behaviour(upstream=registry)
    flags = stack_flags(tmp_path / "root", registry, tmp_path / "udocker")
    del flags["registry"]
    args = [f"--{name.replace('_', '-')}={value}" for name, value in flags.items()]
    leaks: list[str] = []
    stop = threading.Event()
    scanner = threading.Thread(target=_scan_command_lines, args=(password, leaks, stop), daemon=True)
    with running(hub) as h, running(spare) as s:
        env = {**os.environ, "PYTHONPATH": str(REPO), "MF_MIRRORS": f"{h.url},{s.url}",
               "MF_REGISTRY_USER": "mfuser", "MF_REGISTRY_PASSWORD": password}
        scanner.start()
        try:
            done = subprocess.run([sys.executable, "-m", "installer", "up", *args], capture_output=True, text=True,
                                  timeout=600, cwd=REPO, env=env)
        finally:
            stop.set()
            scanner.join()
            installer.down(**flags)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(rf"ok images +pulled 2 \({re.escape(PG)} from {h.url}; {re.escape(SVC)} from {h.url}\), "
                     r"created 2 container\(s\)", out), out
    # Plain lines (no terminal): the bytes, the rate and the time left, then the total.
    assert re.search(r"images +pulling [\d.]+ [MG]B of [\d.]+ MB \(\d+%\), [\d.]+ MB/s, [\d.]+ s left", out), out
    assert re.search(r"images +pulling ([\d.]+ MB) of \1 \(100%\) done", out), out
    # The account was used (a Basic login at the token service), and the spare mirror was never needed.
    basic = "Basic " + base64.b64encode(f"mfuser:{password}".encode()).decode()
    assert basic in h.authorizations and s.requests == []
    # Never on a command line, in a log, a state file, or anything else `up` wrote.
    assert leaks == []
    assert password not in out + done.stderr
    for folder in (tmp_path / "root", tmp_path / "udocker"):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
                data = path.read_bytes()
                assert password.encode() not in data and basic.split()[1].encode() not in data, path
    assert not (tmp_path / "udocker" / "keystore").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_time_left_is_not_guessed_from_the_first_moments() -> None:
    now = [0.0]
    seen: list[Transfer] = []
    meter = Meter("unpacking", 450_000_000, seen.append, every=0.0, clock=lambda: now[0])
    now[0] = 0.5
    meter.add(4_500)
    now[0] = SETTLE_SECONDS + 1.0
    meter.add(60_000_000)
    assert seen[0].left is None and "left" not in seen[0], seen[0]
    assert seen[1].left is not None and seen[1].endswith(" s left"), seen[1]


def test_progress_is_one_redrawn_line_on_a_terminal_and_plain_lines_otherwise() -> None:
    steps = [Transfer("pulling", done, 300_000_000, 20e6, (300e6 - done) / 20e6) for done in (0, 60e6, 120e6)]
    steps.append(Transfer("pulling", 300_000_000, 300_000_000, 20e6, 0.0, finished=True))
    screen = _Terminal()
    printer = Printer(screen)
    for step in steps:
        printer.event(Event("images", step))
    printer.event(Event("images", "pulled 2", 15.0))
    text = screen.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 2
    assert "[####----------------] pulling 60.0 MB of 300.0 MB (20%), 20.0 MB/s, 12.0 s left" in text
    assert "pulling 300.0 MB of 300.0 MB (100%) done\x1b[K\n" in text

    now = [0.0]
    plain = io.StringIO()
    printer = Printer(plain, clock=lambda: now[0])
    for step in steps:
        printer.event(Event("images", step))
        now[0] += 3.0
    lines = plain.getvalue().splitlines()
    # The first, then one every 5 s, and the end: never a line per chunk.
    assert lines == ["  images      pulling 0 bytes of 300.0 MB (0%), 20.0 MB/s, 15.0 s left",
                     "  images      pulling 120.0 MB of 300.0 MB (40%), 20.0 MB/s, 9.0 s left",
                     "  images      pulling 300.0 MB of 300.0 MB (100%) done"]


def test_notebook_panel_shows_a_progress_bar_while_pulling() -> None:
    now = [0.0]
    lines: list[str] = []
    panel = nb.Panel({}, widgets=True, on_line=lines.append, clock=lambda: now[0])
    panel.handle(Event("images", "starting"))
    assert panel.view.transfer.layout.display == "none"
    panel.handle(Event("images", Transfer("pulling", 90_000_000, 300_000_000, 20e6, 10.5)))
    assert panel.view.transfer.layout.display == "flex"
    assert panel.view.bar.value == pytest.approx(0.3)
    assert panel.view.bar_label.value == "90.0 MB of 300.0 MB (30%), 20.0 MB/s, 10.5 s left"
    now[0] += 1
    panel.handle(Event("images", Transfer("pulling", 120_000_000, 300_000_000, 20e6, 9.0)))
    assert panel.view.bar.value == pytest.approx(0.4) and len(lines) == 1  # text lines only every 10 s
    panel.handle(Event("images", Transfer("pulling", 300_000_000, 300_000_000, 20e6, 0.0, finished=True)))
    assert panel.view.bar.value == 1.0 and panel.view.bar.bar_style == "success" and len(lines) == 2
    panel.handle(Event("images", "pulled 2", 16.0))
    assert panel.view.transfer.layout.display == "none"
    assert panel.steps()[0]["message"] == "pulled 2"


def test_colab_secrets_become_credentials_only_when_nothing_else_gives_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Colab's `userdata.get` raises for a secret that is missing or not granted; a runtime outside Colab has none."""
    import types

    secrets_store = {"MF_REGISTRY_USER": "team", "MF_REGISTRY_PASSWORD": "from-colab"}

    def get(name: str) -> str:
        if name not in secrets_store:
            raise KeyError(name)  # Colab raises its SecretNotFoundError
        return secrets_store[name]

    assert nb.colab_registry_secrets({}, {}) == {}  # not on Colab
    google, colab, userdata = (types.ModuleType(n) for n in ("google", "google.colab", "google.colab.userdata"))
    google.__path__, colab.__path__ = [], []
    google.colab, colab.userdata, userdata.get = colab, userdata, get
    for module in (google, colab, userdata):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    assert nb.colab_registry_secrets({}, {}) == {"registry_user": "team", "registry_password": "from-colab"}
    assert nb.colab_registry_secrets({}, {"MF_REGISTRY_USER": "x", "MF_REGISTRY_PASSWORD": "y"}) == {}
    assert nb.colab_registry_secrets({"registry_auth_file": "/f"}, {}) == {}
    del secrets_store["MF_REGISTRY_PASSWORD"]
    assert nb.colab_registry_secrets({}, {}) == {}


def test_a_manifest_naming_a_layer_by_a_path_is_refused(registry: str) -> None:
    """A layer's digest becomes a file name in udocker's folder: a registry cannot name one outside it."""
    import http.server
    import json

    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                       "config": {"digest": "sha256:../../../etc/evil", "size": 1}, "layers": []}).encode()

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.docker.distribution.manifest.v2+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ImageError) as caught:
            pulls.locate(PG, PG_REPO, PG_TAG, [pulls.parse_source(url)], None)
    finally:
        server.shutdown()
        server.server_close()
    assert "that is not a v2 image manifest" in str(caught.value)
