"""Pulling images that get through: registries tried in order, layers fetched side by side.

For each image the registries are asked in order (Docker Hub references: the --mirrors list;
otherwise the one registry the reference or --registry names) for the exact tag, and the first
that serves it is used. A mirror must serve what the first registry (Docker Hub) names: its
digest is compared with the first registry's whenever that one answers a HEAD request (which
Docker Hub does not count as a pull). The layers are downloaded here, several at once and
counted for the progress bar, straight into udocker's layer folder; udocker then takes the
image from a loopback registry in this process that serves what was fetched, so that it
neither downloads anything again nor needs the credentials.
"""

from __future__ import annotations

import http.server
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from . import humanize
from .errors import ConfigError, ImageError
from .registry import Blob, Client, Credentials, Manifest, Refused
from .transfer import Meter, Transfer

Say = Callable[[str], None]

DEFAULT_MIRRORS = ("docker.io", "mirror.gcr.io", "public.ecr.aws/docker/library", "public.ecr.aws/outerbounds")
PARALLEL_LAYERS = 4
_DOCKER_HUB = {"docker.io": "https://registry-1.docker.io", "index.docker.io": "https://registry-1.docker.io",
               "registry-1.docker.io": "https://registry-1.docker.io"}


@dataclass(frozen=True)
class Source:
    """A registry to ask, and how it names a Docker Hub repository."""

    label: str  # as the user wrote it
    url: str
    namespace: str | None = None  # replaces the repository's namespace (public.ecr.aws/docker/library)

    @property
    def is_docker_hub(self) -> bool:
        return self.url == _DOCKER_HUB["docker.io"]

    def repository(self, path: str) -> str:
        return f"{self.namespace}/{path.rsplit('/', 1)[-1]}" if self.namespace else path


def parse_source(entry: str) -> Source:
    """`host[:port][/namespace]`, optionally with http:// or https:// (default https)."""
    text = entry.strip().rstrip("/")
    parts = urlsplit(text if "://" in text else f"https://{text}")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"not a registry: {entry!r} (want host[:port][/namespace])")
    url = _DOCKER_HUB.get(parts.netloc) or f"{parts.scheme}://{parts.netloc}"
    return Source(text, url, parts.path.strip("/") or None)


@dataclass(frozen=True)
class Located:
    """Where one image was found, and what is served from there."""

    ref: str
    source: Source
    client: Client
    repo: str
    tag: str
    manifest: Manifest
    check: str  # what was verified about the image, in words
    tried: tuple[str, ...]  # registries asked before, each with its answer

    def describe(self) -> str:
        before = f" (after {'; '.join(self.tried)})" if self.tried else ""
        return f"{self.ref} from {self.source.label}{before}; {self.check}"


def locate(ref: str, path: str, tag: str, sources: Sequence[Source], credentials: Credentials | None) -> Located:
    """The first registry in `sources` that serves `path:tag`, or an ImageError that tells everything tried.

    Credentials go to the first registry only (the one the reference names): a mirror never sees them.
    """
    tried: list[str] = []
    refusals: list[Refused] = []
    reference: str | None = None
    first = sources[0]
    for number, source in enumerate(sources):
        client = Client(source.url, credentials if number == 0 else None)
        repo = source.repository(path)
        try:
            if number == 0 and len(sources) > 1:
                # A HEAD is not counted as a pull: it gives the digest to hold the mirrors to.
                reference, _ = client.digest(repo, tag)
            manifest = client.manifest(repo, tag)
        except Refused as exc:
            refusals.append(exc)
            tried.append(f"{source.label}: {_short(exc)}")
            if number == 0 and exc.kind == "missing":
                break  # a tag the reference registry does not have is not the image asked for
            continue
        if number and reference and manifest.digest != reference:
            tried.append(f"{source.label}: serves another image under {tag} ({manifest.digest[:19]}…, "
                         f"{first.label} names {reference[:19]}…)")
            continue
        if number == 0:
            check = f"digest {manifest.digest}"
        elif reference:
            check = f"same digest as {first.label} ({manifest.digest})"
        else:
            check = (f"digest {manifest.digest} not compared: {first.label} could not be asked, so the tag "
                     f"{tag} of {source.label} is trusted as is")
        return Located(ref, source, client, repo, tag, manifest, check, tuple(tried))
    raise _not_found(ref, tried, refusals, sources)


def read_credentials(user: str | None, password: str | None, auth_file: Path | None) -> Credentials | None:
    """Credentials from MF_REGISTRY_USER + MF_REGISTRY_PASSWORD, else from the auth file (`user:password`)."""
    if user and password:
        return Credentials(user, password)
    if user or password:
        raise ConfigError("MF_REGISTRY_USER and MF_REGISTRY_PASSWORD go together: only one is set",
                          hint="set both, or neither (or use --registry-auth-file)")
    if auth_file is None:
        return None
    try:
        text = auth_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the registry credentials file {auth_file}: {exc.strerror}",
                          hint="check --registry-auth-file (MF_REGISTRY_AUTH_FILE)") from None
    user, sep, password = text.splitlines()[0].partition(":") if text else ("", "", "")
    if not (sep and user and password):
        raise ConfigError(f"{auth_file} does not hold `user:password` on its first line",
                          hint="write one line: the user name, a colon, the password or access token")
    return Credentials(user, password)


def _short(exc: Refused) -> str:
    return {"missing": "no such tag", "login": f"refused (HTTP {exc.status or 401})",
            "rate-limit": "pull limit reached (HTTP 429)"}.get(exc.kind, exc.message)


def _not_found(ref: str, tried: list[str], refusals: list[Refused], sources: Sequence[Source]) -> ImageError:
    limited = [r for r in refusals if r.kind == "rate-limit"]
    account = "\n".join(f"tried {line}" for line in tried)
    details = "\n".join(r.message for r in refusals if r.kind in ("rate-limit", "login", "broken"))
    tail = "\n".join(x for x in (account, details) if x)
    offline = "or start without any registry: bash scripts/offline_up.sh"
    if limited:
        first = limited[0]
        hub = "Docker Hub" if any(s.is_docker_hub for s in sources) else urlsplit(first.message.split()[0]).netloc
        when = f"in up to {humanize.duration(first.retry_in)}" if first.retry_in else "later"
        message = (f"could not pull {ref}: {hub} refused it with HTTP 429 (too many requests). Docker Hub "
                   "allows anonymous clients only a few pulls per hour, counted per IP address, and this "
                   "machine shares its address with others; no other registry tried serves this exact tag")
        hint = (f"set MF_REGISTRY_USER and MF_REGISTRY_PASSWORD (or --registry-auth-file) to a Docker Hub "
                f"account (a free one has its own, higher limit); or wait: the limit resets {when}; or add "
                f"a registry that holds {ref} to --mirrors (MF_MIRRORS); {offline}")
        return ImageError(message, log_tail=tail, hint=hint)
    if any(r.kind == "login" for r in refusals):
        return ImageError(f"could not pull {ref}: a registry refused access and no other serves it",
                          log_tail=tail, hint="check MF_REGISTRY_USER / MF_REGISTRY_PASSWORD (or "
                                              f"--registry-auth-file), or the image reference; {offline}")
    if refusals and all(r.kind == "unreachable" for r in refusals):
        return ImageError(f"could not pull {ref}: no registry could be reached", log_tail=tail,
                          hint=f"check this machine's internet access (or --registry / --mirrors); {offline}")
    return ImageError(f"image {ref} is in none of the registries tried", log_tail=tail,
                      hint=f"check the image reference, --registry (MF_REGISTRY) and --mirrors (MF_MIRRORS); {offline}")


def fetch_layers(found: Sequence[Located], layers_dir: Path, progress: Callable[[str], None],
                 parallel: int = PARALLEL_LAYERS) -> int:
    """Download every layer not yet in `layers_dir`, `parallel` at a time; returns the bytes fetched."""
    layers_dir.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, tuple[Located, Blob]] = {}
    for item in found:
        for blob in item.manifest.blobs:
            target = layers_dir / blob.digest
            if not (target.is_file() and target.stat().st_size == blob.size):
                wanted.setdefault(blob.digest, (item, blob))
    total = sum(blob.size for _, blob in wanted.values())
    if not wanted:
        return 0
    meter = Meter("pulling", total, progress)
    # Largest first: the long downloads start at once and the small ones fill the gaps.
    order = sorted(wanted.values(), key=lambda pair: -pair[1].size)
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="mfstack-pull") as pool:
        futures = [pool.submit(item.client.fetch_blob, item.repo, blob, layers_dir / blob.digest, meter.add)
                   for item, blob in order]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]
    meter.finish()
    return total


class _Front(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, layers_dir: Path) -> None:
        super().__init__(("127.0.0.1", 0), _FrontHandler)
        self.layers_dir = layers_dir
        self.prefix = "/" + secrets.token_hex(16)
        self.current: Manifest | None = None


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    server: _Front

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        front = self.server
        path = self.path.split("?", 1)[0]
        if not path.startswith(front.prefix + "/v2/"):
            return self._send(404, b"{}", "application/json", body)
        rest = path[len(front.prefix) + len("/v2/"):]
        manifest = front.current
        if rest == "":
            return self._send(200, b"{}", "application/json", body)
        if "/manifests/" in rest and manifest is not None:
            return self._send(200, manifest.body, manifest.media_type, body)
        if "/blobs/" in rest:
            digest = rest.rsplit("/", 1)[-1]
            target = front.layers_dir / digest
            if "/" not in digest and digest.startswith("sha256:") and target.is_file():
                return self._send_file(target, body)
        return self._send(404, b'{"errors":[{"code":"NOT_FOUND"}]}', "application/json", body)

    def _send(self, status: int, data: bytes, media_type: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _send_file(self, target: Path, body: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(target.stat().st_size))
        self.end_headers()
        if body:
            with open(target, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    self.wfile.write(chunk)

    def log_message(self, format: str, *args: object) -> None:  # udocker's requests are not news
        pass


@contextmanager
def loopback_registry(layers_dir: Path) -> Iterator[_Front]:
    """A registry on 127.0.0.1, under a random path, serving `current` and the fetched layers."""
    front = _Front(layers_dir)
    thread = threading.Thread(target=front.serve_forever, name="mfstack-loopback-registry", daemon=True)
    thread.start()
    try:
        yield front
    finally:
        front.shutdown()
        front.server_close()
        thread.join(timeout=5)


def front_url(front: _Front) -> str:
    host, port = front.server_address[:2]
    return f"http://{host}:{port}{front.prefix}"


def summary(found: Sequence[Located]) -> str:
    return "; ".join(f"{item.ref} from {item.source.label}" for item in found)


__all__ = ["DEFAULT_MIRRORS", "Located", "Source", "Transfer", "fetch_layers", "front_url", "locate",
           "loopback_registry", "parse_source", "summary"]
