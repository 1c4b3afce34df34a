"""A Cloudflare quick tunnel in front of the stack's entry point.

`start_tunnel` obtains `cloudflared` (an explicit binary, or the pinned release,
checksum-verified and cached under `<MF_CACHE_DIR>/bin/`, on local disk), runs

    cloudflared tunnel --no-autoupdate --url http://127.0.0.1:<port> --metrics 127.0.0.1:<free port>

as a detached, logged process, learns the public URL from its stderr banner or
from `GET /quicktunnel` on its metrics address, and reports success only once
the stack's `/healthz` answers through that URL. The running tunnel is recorded
in `<state>/tunnel.json` and the connection string in `<MF_ROOT>/connection.json`.

A quick tunnel gets a new random URL every time cloudflared starts, so a monitor
calls `ensure_tunnel` periodically: it restarts a dead cloudflared, learns the
new URL and rewrites `connection.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import procs
from .connection import write_connection_file, write_private_json
from .errors import TunnelError
from .settings import Settings

if TYPE_CHECKING:
    import requests


@dataclass(frozen=True)
class CloudflaredRelease:
    version: str
    sha256: Mapping[str, str]  # architecture (amd64, arm64) -> SHA-256 of the release asset
    url_template: str = ("https://github.com/cloudflare/cloudflared/releases/download/"
                         "{version}/cloudflared-linux-{arch}")


# Checksums as published in the SHA256 block of the release notes of cloudflared 2026.9.3
# (cloudflared-linux-amd64: 40,122,749 bytes; cloudflared-linux-arm64: 37,685,657 bytes).
CLOUDFLARED_RELEASE = CloudflaredRelease(
    version="2026.9.3",
    sha256={
        "amd64": "77e26d8d900e0b8469f416239d14b5f296525fdf79fee6f511ef55609e3fbac2",
        "arm64": "aaeb2d7d0da3614634c7e03ab13487a1522c2e79165ed2929cfe23d5e95b326d",
    },
)

CLOUDFLARED_ENV = "MF_CLOUDFLARED"

# What a quick tunnel's public address looks like in cloudflared's banner: hyphenated words, one
# label, nothing after it; so that cloudflared's own API address in an error line is not taken for it.
QUICK_TUNNEL_URL = r"https://[a-z0-9]+(?:-[a-z0-9]+)+\.trycloudflare\.com(?![\w/.-])"

TUNNEL_LOG = "tunnel"
STATE_FILE = "tunnel.json"

_ESCAPE_HINT = ("download cloudflared yourself (https://github.com/cloudflare/cloudflared/releases) and pass "
                "--cloudflared PATH (or set MF_CLOUDFLARED=PATH)")


@dataclass(frozen=True)
class TunnelInfo:
    url: str
    pid: int
    log: Path
    metrics: str            # host:port of cloudflared's metrics server
    port: int               # the local port the tunnel forwards to
    cloudflared: Path
    start_ticks: int        # from /proc, so a recycled pid is not mistaken for ours
    started_at: float
    url_pattern: str = QUICK_TUNNEL_URL

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["log"] = str(self.log)
        data["cloudflared"] = str(self.cloudflared)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TunnelInfo:
        return cls(url=str(data["url"]), pid=int(data["pid"]), log=Path(data["log"]),
                   metrics=str(data["metrics"]), port=int(data["port"]),
                   cloudflared=Path(data["cloudflared"]), start_ticks=int(data["start_ticks"]),
                   started_at=float(data["started_at"]),
                   url_pattern=str(data.get("url_pattern") or QUICK_TUNNEL_URL))


@dataclass(frozen=True)
class TunnelCheck:
    """What `ensure_tunnel` found and did: action is 'kept', 'restarted' or 'started'."""

    info: TunnelInfo
    action: str
    previous_url: str | None = None

    @property
    def url_changed(self) -> bool:
        return self.previous_url is not None and self.previous_url != self.info.url


# ---------------------------------------------------------------- the binary

def machine_arch() -> str:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "amd64"
    if machine in ("aarch64", "arm64"):
        return "arm64"
    raise TunnelError(f"no pinned cloudflared build for this machine ({machine})", hint=_ESCAPE_HINT)


def find_cloudflared(root: Path, explicit: str | Path | None = None, *,
                     release: CloudflaredRelease = CLOUDFLARED_RELEASE,
                     download_timeout: float = 120.0) -> Path:
    """The cloudflared to run: `explicit`, else $MF_CLOUDFLARED, else the pinned release.

    The pinned release is downloaded once into `<root>/bin/` and its checksum is
    checked on every use, so a truncated or tampered file is never run.
    """
    chosen = explicit if explicit is not None else os.environ.get(CLOUDFLARED_ENV) or None
    if chosen is not None:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise TunnelError(f"cloudflared not found at {path}",
                              hint="pass --cloudflared PATH pointing at the cloudflared executable")
        if not os.access(path, os.X_OK):
            raise TunnelError(f"{path} is not executable", hint=f"run: chmod +x {path}")
        return path.resolve()
    arch = machine_arch()
    expected = release.sha256.get(arch)
    if not expected:
        raise TunnelError(f"no checksum pinned for cloudflared {release.version} on {arch}", hint=_ESCAPE_HINT)
    target = Path(root) / "bin" / f"cloudflared-{release.version}-{arch}"
    if target.is_file() and _sha256(target) == expected:
        return target
    return download_cloudflared(target, release.url_template.format(version=release.version, arch=arch),
                                expected, timeout=download_timeout)


def download_cloudflared(target: Path, url: str, expected_sha256: str, *, timeout: float = 120.0) -> Path:
    """Fetch `url` into `target` (mode 0755) only if its SHA-256 is `expected_sha256`."""
    import requests  # loaded on use: the monitor imports this module to check the tunnel is alive
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=(15, timeout)) as response:
            if response.status_code != 200:
                raise TunnelError(f"downloading cloudflared from {url} failed: HTTP {response.status_code}",
                                  hint=_ESCAPE_HINT)
            with open(partial, "wb") as out:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except requests.RequestException as exc:
        partial.unlink(missing_ok=True)
        raise TunnelError(f"cannot download cloudflared from {url}: {_reason(exc)}", hint=_ESCAPE_HINT) from exc
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise TunnelError(f"cannot write {partial}: {exc}", hint=_ESCAPE_HINT) from exc
    except TunnelError:
        partial.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if actual != expected_sha256:
        partial.unlink(missing_ok=True)
        raise TunnelError(f"checksum mismatch for cloudflared downloaded from {url}: "
                          f"expected sha256 {expected_sha256}, got {actual}; the file was discarded",
                          hint=_ESCAPE_HINT)
    partial.chmod(0o755)
    os.replace(partial, target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests failure, which is what says what went wrong."""
    for _ in range(10):
        inner = None
        if exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        elif isinstance(getattr(exc, "reason", None), BaseException):
            inner = exc.reason  # type: ignore[attr-defined]
        elif exc.__cause__ is not None:
            inner = exc.__cause__
        if inner is None:
            break
        exc = inner
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


# ---------------------------------------------------------------- running it

def state_path(settings: Settings) -> Path:
    return settings.state_dir / STATE_FILE


def read_tunnel_state(settings: Settings) -> TunnelInfo | None:
    """The tunnel recorded by the last `start_tunnel`, alive or not; None if none."""
    try:
        return TunnelInfo.from_json(json.loads(state_path(settings).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_tunnel(settings: Settings, *, token: str, cloudflared: str | Path | None = None,
                 url_timeout: float = 60.0, reach_timeout: float = 90.0,
                 url_pattern: str = QUICK_TUNNEL_URL,
                 release: CloudflaredRelease = CLOUDFLARED_RELEASE) -> TunnelInfo:
    """Start a quick tunnel to `settings.port`, wait until the stack answers through it.

    `token` is the stack's access token: a public URL without one would hand the
    metadata API (writes included) to anyone who finds it, so it is required.
    Writes `<state>/tunnel.json` and `<root>/connection.json`. `url_pattern` says what
    a public address looks like in the banner (a regular expression). A tunnel this
    stack already runs is stopped first: one stack, one public address.
    """
    if not token:
        raise TunnelError("refusing to publish the stack without an access token",
                          hint="start the stack with access control on (do not use --no-auth with a tunnel)")
    stop_recorded_tunnel(settings)
    # Local disk, not MF_ROOT: Drive may be mounted noexec, and is slow to read a 30 MB binary from.
    binary = find_cloudflared(settings.cache_dir, cloudflared, release=release)
    log_path = settings.log_path(TUNNEL_LOG)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    metrics = f"127.0.0.1:{procs.free_port()}"
    cmd = [str(binary), "tunnel", "--no-autoupdate", "--url", f"http://127.0.0.1:{settings.port}",
           "--metrics", metrics]
    try:
        pid = procs.spawn(cmd, log_path=log_path)
    except Exception as exc:
        raise TunnelError(f"cannot start {binary}: {exc}", hint=_ESCAPE_HINT, log=log_path) from exc
    info_proc = procs.proc_info(pid)
    try:
        url = _wait_for_url(pid, log_path, offset, metrics, url_pattern, url_timeout)
        _wait_reachable(url, pid, log_path, metrics, reach_timeout)
    except BaseException:
        procs.terminate(pid)
        raise
    info = TunnelInfo(url=url, pid=pid, log=log_path, metrics=metrics, port=settings.port,
                      cloudflared=binary, start_ticks=info_proc.start_ticks if info_proc else 0,
                      started_at=time.time(), url_pattern=url_pattern)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    write_private_json(state_path(settings), info.to_json())
    write_connection_file(settings.root, url, token, {"tunnel": True})
    return info


def tunnel_alive(info: TunnelInfo) -> bool:
    """Whether the cloudflared process `info` describes is still running."""
    current = procs.proc_info(info.pid)
    return current is not None and (info.start_ticks == 0 or current.start_ticks == info.start_ticks)


def stop_tunnel(info: TunnelInfo, timeout: float = 10.0) -> None:
    """Stop cloudflared: SIGTERM, a bounded wait, then SIGKILL to its whole group."""
    if tunnel_alive(info):
        procs.terminate(info.pid, timeout)


def stop_recorded_tunnel(settings: Settings, timeout: float = 10.0) -> bool:
    """Stop the tunnel recorded in the state folder (for `down`); False if none was running."""
    info = read_tunnel_state(settings)
    if info is None or not tunnel_alive(info):
        return False
    stop_tunnel(info, timeout)
    return True


def ensure_tunnel(settings: Settings, *, token: str, info: TunnelInfo | None = None,
                  cloudflared: str | Path | None = None, url_timeout: float = 60.0,
                  reach_timeout: float = 90.0, url_pattern: str | None = None,
                  release: CloudflaredRelease = CLOUDFLARED_RELEASE) -> TunnelCheck:
    """For a monitor loop: keep the tunnel running, restarting it if cloudflared exited.

    Uses `info`, else the tunnel recorded on disk. A restart gets a NEW public URL;
    `connection.json` is rewritten with it (start_tunnel does that).
    """
    current = info if info is not None else read_tunnel_state(settings)
    if current is not None and tunnel_alive(current):
        return TunnelCheck(info=current, action="kept")
    new = start_tunnel(
        settings, token=token,
        cloudflared=cloudflared if cloudflared is not None else _reusable(current),
        url_timeout=url_timeout, reach_timeout=reach_timeout,
        url_pattern=url_pattern or (current.url_pattern if current else QUICK_TUNNEL_URL),
        release=release)
    if current is None:
        return TunnelCheck(info=new, action="started")
    return TunnelCheck(info=new, action="restarted", previous_url=current.url)


def _reusable(previous: TunnelInfo | None) -> Path | None:
    """The binary the previous tunnel ran, if it is still there (else resolve it again)."""
    if previous is not None and previous.cloudflared.is_file() and os.access(previous.cloudflared, os.X_OK):
        return previous.cloudflared
    return None


# ---------------------------------------------------------------- discovery

def find_url(text: str, url_pattern: str = QUICK_TUNNEL_URL) -> str | None:
    """The first public tunnel address in cloudflared's output, if any."""
    match = re.search(url_pattern, text)
    return match.group(0).rstrip("/") if match else None


def query_metrics_url(metrics: str, url_pattern: str = QUICK_TUNNEL_URL, timeout: float = 2.0) -> str | None:
    """The public address cloudflared reports on `GET /quicktunnel`, if it reports one yet."""
    import requests
    try:
        response = requests.get(f"http://{metrics}/quicktunnel", timeout=timeout)
        hostname = response.json().get("hostname") if response.status_code == 200 else None
    except (requests.RequestException, ValueError, AttributeError):
        return None
    if not hostname or not isinstance(hostname, str):
        return None
    url = hostname if "://" in hostname else f"https://{hostname}"
    return url.rstrip("/") if re.fullmatch(url_pattern, url.rstrip("/")) else None


def _wait_for_url(pid: int, log_path: Path, offset: int, metrics: str, url_pattern: str,
                  timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        url = find_url(_output_since(log_path, offset), url_pattern) or query_metrics_url(metrics, url_pattern)
        if url:
            return url
        if not procs.alive(pid):
            code = procs.exit_code(pid)
            raise TunnelError(
                f"cloudflared exited{f' with code {code}' if code is not None else ''} "
                "before it reported a public URL",
                hint="read the log above; if cloudflared cannot reach Cloudflare, this machine has no "
                     "outbound internet access, and the stack stays reachable on localhost only",
                log=log_path, log_tail=procs.tail(log_path))
        if time.monotonic() >= deadline:
            raise TunnelError(
                f"cloudflared reported no public URL within {timeout:.0f} s "
                f"(watched its log and http://{metrics}/quicktunnel)",
                hint="Cloudflare may be slow or refusing quick tunnels right now: try again in a minute",
                log=log_path, log_tail=procs.tail(log_path))
        time.sleep(0.2)


def _wait_reachable(url: str, pid: int, log_path: Path, metrics: str, timeout: float) -> None:
    """Poll `<url>/healthz` until the stack answers through the tunnel."""
    import requests
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        # Asking for the new name before cloudflared holds an edge connection only earns a
        # negative answer that resolvers may cache for minutes.
        if _edge_ready(metrics) is False:
            last = "cloudflared has no connection to Cloudflare's edge yet"
        else:
            try:
                response = requests.get(f"{url}/healthz", timeout=min(10.0, max(1.0, timeout)))
                if response.status_code == 200 and _status_ok(response):
                    return
                last = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                last = _reason(exc)
        if not procs.alive(pid):
            raise TunnelError(f"cloudflared exited while waiting for the stack to answer at {url}",
                              log=log_path, log_tail=procs.tail(log_path),
                              hint="start the tunnel again; if it keeps exiting, read its log")
        if time.monotonic() >= deadline:
            raise TunnelError(
                f"the stack did not answer through the tunnel {url}/healthz within {timeout:.0f} s "
                f"(last: {last})",
                hint="check the stack answers locally (python -m installer status); a new quick tunnel "
                     "can take a minute to become reachable: try again",
                log=log_path, log_tail=procs.tail(log_path))
        time.sleep(1.0)


def _edge_ready(metrics: str) -> bool | None:
    """cloudflared's own `GET /ready`: True once connected to the edge, None if it cannot tell."""
    import requests
    try:
        response = requests.get(f"http://{metrics}/ready", timeout=2.0)
    except requests.RequestException:
        return None
    if response.status_code == 200:
        return True
    return False if response.status_code == 503 else None


def _status_ok(response: requests.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == "ok"


def _output_since(path: Path, offset: int) -> str:
    """What cloudflared wrote to its log after `offset`, without the header line `spawn` adds
    (it repeats the command line, whose --url must not pass for the public address)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.splitlines() if not line.startswith("--- "))
