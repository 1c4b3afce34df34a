"""A client for image registries (the Docker Registry HTTP API v2), for what udocker does not say.

udocker reports every registry refusal as "Error: pulling manifest:", so the installer asks
registries itself: which tag exists where, its digest, its layers and their sizes, and why a
registry refused (Docker Hub's pull limit, a login that is needed or wrong, a missing tag).
It also downloads layers, so that their bytes can be counted and fetched side by side.
Credentials stay in this process: they go to a registry's token service over HTTP, never to
a command line, a log or a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .errors import ImageError

MANIFEST_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
_INDEX_TYPES = MANIFEST_TYPES[0], MANIFEST_TYPES[2]
_CHUNK = 256 * 1024
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)

    def __repr__(self) -> str:  # never the password, whatever prints this
        return f"Credentials(user={self.user!r})"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """One image for this machine's platform: what udocker is served, and what it needs."""

    digest: str  # of what the tag names (an index for multi-platform images)
    body: bytes  # the platform's own manifest
    media_type: str
    blobs: tuple[Blob, ...]  # layers, then the config

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs)


class Refused(ImageError):
    """A registry answered, but not with the image: `kind` says why."""

    def __init__(self, message: str, *, kind: str, status: int | None = None, retry_in: float | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind  # rate-limit, login, missing, unreachable, broken
        self.status = status
        self.retry_in = retry_in


def host_platform() -> tuple[str, str]:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return "linux", arch


class Client:
    """One registry, with its bearer tokens (one per repository) and optional credentials."""

    def __init__(self, url: str, credentials: Credentials | None = None, timeout: float = 20.0) -> None:
        self.url = url.rstrip("/")
        self.credentials = credentials
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = True
        self._tokens: dict[str, str] = {}

    # --- requests with the token dance ---------------------------------------

    def _request(self, method: str, path: str, repo: str, *, headers: dict | None = None,
                 stream: bool = False) -> requests.Response:
        headers = dict(headers or {})
        for attempt in range(2):
            if repo in self._tokens:
                headers["Authorization"] = self._tokens[repo]
            try:
                answer = self.session.request(method, f"{self.url}{path}", headers=headers, stream=stream,
                                              timeout=self.timeout, allow_redirects=True)
            except requests.RequestException as exc:
                raise Refused(f"{self.url} did not answer ({network_reason(exc)})", kind="unreachable") from exc
            if answer.status_code != 401 or attempt:
                return answer
            challenge = answer.headers.get("WWW-Authenticate", "")
            answer.close()
            self._tokens[repo] = self._authorise(challenge, repo)
        raise AssertionError("unreachable")

    def _authorise(self, challenge: str, repo: str) -> str:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if not self.credentials:
                raise Refused(f"{self.url} wants a login", kind="login", status=401)
            return requests.auth._basic_auth_str(self.credentials.user, self.credentials.password)
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        if scheme.lower() != "bearer" or "realm" not in fields:
            raise Refused(f"{self.url} refused access and named no way to log in", kind="login", status=401)
        query = {"service": fields.get("service", ""), "scope": fields.get("scope") or f"repository:{repo}:pull"}
        auth = (self.credentials.user, self.credentials.password) if self.credentials else None
        try:
            answer = self.session.get(fields["realm"], params=query, auth=auth, timeout=self.timeout)
        except requests.RequestException as exc:
            raise Refused(f"the token service of {self.url} did not answer ({network_reason(exc)})",
                          kind="unreachable") from exc
        if answer.status_code in (401, 403):
            raise Refused(f"{self.url} refused the login" + (f" of {self.credentials.user}" if self.credentials
                                                              else " (it wants credentials)"),
                          kind="login", status=answer.status_code)
        if answer.status_code == 429:
            raise _refusal(self.url, answer, f"a token for {repo}")
        try:
            data = answer.json()
            token = data.get("token") or data["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise Refused(f"the token service of {self.url} gave no token (HTTP {answer.status_code})",
                          kind="broken", status=answer.status_code) from None
        return f"Bearer {token}"

    # --- what the registry holds ---------------------------------------------

    def digest(self, repo: str, reference: str) -> tuple[str | None, dict[str, str]]:
        """The digest the tag names, by a HEAD request (Docker Hub does not count these as pulls).

        Also returns the rate-limit headers, which Docker Hub sends on HEAD too.
        """
        answer = self._request("HEAD", f"/v2/{repo}/manifests/{reference}", repo,
                               headers={"Accept": ", ".join(MANIFEST_TYPES)})
        limits = {k.lower(): v for k, v in answer.headers.items() if k.lower().startswith("ratelimit")}
        if answer.status_code == 200:
            return answer.headers.get("Docker-Content-Digest"), limits
        raise _refusal(self.url, answer, f"{repo}:{reference}")

    def manifest(self, repo: str, reference: str) -> Manifest:
        """The manifest of `repo:reference` for this machine's platform (counts as one pull on Docker Hub)."""
        body, media_type, digest = self._get_manifest(repo, reference)
        top = digest
        if media_type in _INDEX_TYPES:
            wanted = host_platform()
            try:
                entries = json.loads(body)["manifests"]
                chosen = next(e for e in entries if (e.get("platform", {}).get("os"),
                                                     e.get("platform", {}).get("architecture")) == wanted)
            except (ValueError, KeyError, TypeError, StopIteration):
                raise Refused(f"{self.url} has {repo}:{reference}, but not for {'/'.join(wanted)}",
                              kind="missing") from None
            body, media_type, _ = self._get_manifest(repo, chosen["digest"])
        try:
            data = json.loads(body)
            blobs = tuple(Blob(item["digest"], int(item["size"])) for item in [*data["layers"], data["config"]])
            # A digest becomes a file name in udocker's layer folder: nothing but a well-formed one.
            if not all(_DIGEST.fullmatch(blob.digest) and blob.size >= 0 for blob in blobs):
                raise ValueError("a malformed layer digest or size")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise Refused(f"{self.url} sent a manifest for {repo}:{reference} that is not a v2 image manifest",
                          kind="broken") from None
        return Manifest(top, body, media_type, blobs)

    def _get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        answer = self._request("GET", f"/v2/{repo}/manifests/{reference}", repo,
                               headers={"Accept": ", ".join(MANIFEST_TYPES)})
        if answer.status_code != 200:
            raise _refusal(self.url, answer, f"{repo}:{reference}")
        body = answer.content
        digest = answer.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()
        media_type = answer.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in MANIFEST_TYPES:
            try:
                media_type = json.loads(body).get("mediaType", media_type)
            except ValueError:
                pass
        return body, media_type, digest

    def fetch_blob(self, repo: str, blob: Blob, target: Path, on_bytes: Callable[[int], None]) -> None:
        """Download `blob` to `target` (through a partial file), checked against its digest."""
        algorithm, _, expected = blob.digest.partition(":")
        if algorithm not in ("sha256", "sha512"):
            raise Refused(f"{self.url} names a layer by an unknown digest: {blob.digest[:80]!r}", kind="broken")
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        answer = self._request("GET", f"/v2/{repo}/blobs/{blob.digest}", repo, stream=True)
        if answer.status_code != 200:
            raise _refusal(self.url, answer, f"layer {blob.digest} of {repo}")
        hasher = hashlib.new(algorithm)
        try:
            with answer, open(partial, "wb") as out:
                for chunk in answer.iter_content(_CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    on_bytes(len(chunk))
            if hasher.hexdigest() != expected:
                raise Refused(f"layer {blob.digest} from {self.url} does not match its digest",
                              kind="broken", hint="pull again; if it persists, that registry serves damaged data")
            partial.replace(target)
        except requests.RequestException as exc:
            raise Refused(f"downloading layer {blob.digest} from {self.url} broke off ({network_reason(exc)})",
                          kind="unreachable", hint="run `up` again: finished layers are kept") from exc
        except OSError as exc:
            raise ImageError(f"cannot write layer {blob.digest} under {target.parent}: {exc.strerror}",
                             hint="free some space there, or point --udocker-dir (UDOCKER_DIR) to a larger "
                                  "disk; finished layers are kept") from exc
        finally:
            partial.unlink(missing_ok=True)


def _refusal(url: str, answer: requests.Response, what: str) -> Refused:
    status = answer.status_code
    message = _registry_message(answer)
    if status == 429:
        retry_in = _retry_in(answer.headers)
        return Refused(f"{url} refused {what} with HTTP 429 (too many requests){': ' + message if message else ''}",
                       kind="rate-limit", status=status, retry_in=retry_in)
    if status in (401, 403):
        return Refused(f"{url} refused access to {what} (HTTP {status}){': ' + message if message else ''}",
                       kind="login", status=status)
    if status == 404:
        return Refused(f"{url} has no {what}", kind="missing", status=status)
    return Refused(f"{url} answered HTTP {status} for {what}{': ' + message if message else ''}",
                   kind="broken", status=status)


def _registry_message(answer: requests.Response) -> str:
    try:
        errors = answer.json().get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)[:300]
    except (ValueError, AttributeError, TypeError):
        return ""


def _retry_in(headers: requests.structures.CaseInsensitiveDict) -> float | None:
    """Seconds until a retry may work: Retry-After, else the window of Docker Hub's RateLimit headers."""
    after = headers.get("Retry-After", "")
    if after.strip().isdigit():
        return float(after)
    for name in ("ratelimit-reset", "ratelimit-limit", "ratelimit-remaining"):
        window = re.search(r"w=(\d+)", headers.get(name, ""))
        if window:
            return float(window.group(1))
    return None


def network_reason(exc: requests.RequestException) -> str:
    """Why a request failed, in words a user can act on."""
    text = str(exc)
    for marker, reason in (("Name or service not known", "cannot resolve its host name"),
                           ("Temporary failure in name resolution", "cannot resolve its host name"),
                           ("Unable to connect to proxy", "the proxy refused the connection"),
                           ("Connection refused", "connection refused"), ("timed out", "timed out")):
        if marker in text:
            return reason
    return type(exc).__name__
