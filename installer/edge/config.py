"""What the entry point is configured with, and the configurations it refuses to run with."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from yarl import URL

from ..errors import ConfigError

S3_PREFIX = "/s3"


@dataclass(frozen=True)
class ProxyConfig:
    listen_host: str
    listen_port: int
    metadata_url: str
    ui_backend_url: str
    static_dir: Path
    token_file: Path | None = None  # required unless no_auth
    no_auth: bool = False
    behind_tunnel: bool = False      # trust the tunnel's Cf-Connecting-Ip / X-Forwarded-Proto from loopback
    connect_timeout: float = 5.0
    read_timeout: float = 600.0      # longest silence allowed from an upstream mid-response
    max_line_size: int = 16 * 1024
    max_field_size: int = 16 * 1024
    max_headers: int = 128
    pool_size: int = 100
    failure_delay_base: float = 0.05
    failure_delay_cap: float = 2.0
    failure_allowance: int = 3
    global_failures_per_s: float = 10.0   # failed credentials accepted per second, all clients together
    global_failure_burst: int = 100
    head_deadline: float = 10.0       # seconds from a request head's first byte to its end
    idle_timeout: float = 75.0        # a kept-alive connection with no request at all
    connections_per_client: int = 256
    tunnel_connections: int = 2048   # cloudflared's loopback peer with --behind-tunnel: every visitor shares it
    in_flight_per_visitor: int = 64  # requests in progress per tunnel visitor (Cf-Connecting-Ip)
    shutdown_timeout: float = 3.0
    s3_socket: Path | None = None              # the object store's unix socket; None: no /s3 route
    s3_internal_secret_file: Path | None = None
    s3_max_body: int = 512 * 1024 * 1024       # one request's body (multipart parts are far smaller)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def upstream_base(url: str, what: str) -> URL:
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{what} URL must look like http://HOST:PORT, not {url!r}")
    return parsed.with_path(parsed.path.rstrip("/")).with_query(None).with_fragment(None)


def validate(config: ProxyConfig) -> None:
    """Raise ConfigError for a configuration the proxy must not run with."""
    if config.no_auth and not is_loopback(config.listen_host):
        raise ConfigError(
            f"refusing to serve without access control on {config.listen_host}: "
            "anyone who can reach that address could read and write all run data",
            hint="drop --no-auth (use the token), or listen on 127.0.0.1")
    if not config.no_auth and config.token_file is None:
        raise ConfigError("no token file given", hint="pass --token-file PATH (it is created if missing)")
    if not Path(config.static_dir).is_dir():
        raise ConfigError(f"UI files not found: {config.static_dir} is not a folder",
                          hint="point --static-dir at the UI bundle (the folder holding index.html)")
    upstream_base(config.metadata_url, "metadata service")
    upstream_base(config.ui_backend_url, "UI backend")
