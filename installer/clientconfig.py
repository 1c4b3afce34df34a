"""Point the Metaflow client on this machine at a running stack, after checking it works.

`connect` takes the connection string (or a URL and token, or finds
`<MF_ROOT>/connection.json`), checks, in order, that the address is reachable,
that it is this kind of stack, that the metadata service behind it answers with
a version the client can use, and that the token is accepted; each failure
raises its own ConnectError subclass whose `reason` names it. Then it writes a
Metaflow config profile and/or sets the same values in this process's
environment, and returns what it did and what the UI will be able to show.

The datastore: a stack that serves an object store under `<base>/s3` gets the
S3 datastore (bucket and root fixed by convention, credentials derived from
the token, see installer/s3auth.py), after a signed HeadBucket through that
route succeeds; `datastore="local"` keeps runs' data on this machine instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import socket
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from .connection import (
    BadConnectionString,
    format_connection,
    normalise_base_url,
    parse_connection,
    read_connection_file,
    write_private_json,
)
from . import s3auth
from .errors import ConfigError, ConnectError

# The client needs 2.0.6 to read task attempts and 2.3.0 to change tags.
MIN_SERVICE_VERSION = (2, 3, 0)

CONFIG_DIR_ENV = "METAFLOW_HOME"
DEFAULT_CONFIG_DIR = "~/.metaflowconfig"


# ---------------------------------------------------------------- failures, one class each

class NameNotResolved(ConnectError):
    reason = "dns"


class TLSFailed(ConnectError):
    reason = "tls"


class ConnectTimedOut(ConnectError):
    reason = "timeout"


class ConnectionRefused(ConnectError):
    reason = "refused"


class Unreachable(ConnectError):
    reason = "unreachable"


class StackUnreachable(ConnectError):
    """Something in front of the stack (the tunnel's edge) answered, the stack did not."""

    reason = "stack_unreachable"


class Redirected(ConnectError):
    reason = "redirect"


class NotAStack(ConnectError):
    reason = "not_a_stack"


class WrongToken(ConnectError):
    reason = "unauthorized"


class ServiceDown(ConnectError):
    reason = "service_down"


class ServiceTooOld(ConnectError):
    reason = "service_version"


class ProfileError(ConnectError):
    reason = "profile"


class NoObjectStore(ConnectError):
    reason = "no_object_store"


class ObjectStoreRefused(ConnectError):
    reason = "object_store_refused"


class ObjectStoreDown(ConnectError):
    reason = "object_store_down"


# The object store's place on the stack, by convention (installer/objectstore.py serves it).
S3_ROUTE = "/s3"
S3_BUCKET = "metaflow"
S3_ROOT = f"s3://{S3_BUCKET}/data"
DATASTORES = ("auto", "s3", "local")


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class DatastorePlan:
    """Where runs from this machine keep their data, and what that means for the UI."""

    kind: str                              # "local" or "s3"
    settings: Mapping[str, str] = field(repr=False)  # METAFLOW_* keys for the client (may hold a secret)
    ui_shows: tuple[str, ...]
    ui_misses: tuple[str, ...]
    statement: str


@dataclass(frozen=True)
class ConnectResult:
    base_url: str
    service_url: str
    service_version: str
    profile: str | None
    settings: Mapping[str, str] = field(repr=False)   # every METAFLOW_* value set (holds the token)
    config_path: Path | None
    config_action: str                     # created | updated | unchanged | not written
    replaced: Mapping[str, str]            # our keys that held another value before (token masked)
    kept_keys: tuple[str, ...]             # keys of the existing profile left as they were
    env_set: bool
    datastore: DatastorePlan
    notes: tuple[str, ...] = ()
    connection_string: str = field(default="", repr=False)

    def lines(self) -> list[str]:
        """A plain-text account for a notebook cell or a terminal (no token shown)."""
        out = [f"connected to {self.base_url} (metadata service {self.service_version})"]
        if self.config_path is not None:
            where = f"profile {self.profile!r}" if self.profile else "default profile"
            out.append(f"Metaflow {where}: {self.config_path} ({self.config_action})")
            for key, old in self.replaced.items():
                out.append(f"  replaced {key} (was {old})")
            if self.kept_keys:
                out.append(f"  kept other keys: {', '.join(self.kept_keys)}")
        if self.env_set:
            out.append("set in this process's environment: " + ", ".join(sorted(self.settings)))
        out.append(self.datastore.statement)
        out.extend(self.notes)
        return out


# ---------------------------------------------------------------- the verb

def connect(connection: str | None = None, *, url: str | None = None, token: str | None = None,
            profile: str | None = None, root: str | Path | None = None, set_env: bool = True,
            write_profile: bool = True, timeout: float = 10.0,
            datastore_root: str | Path | None = None, datastore: str = "auto") -> ConnectResult:
    """Check the stack at `connection` (or `url` + `token`, or `<root>/connection.json`) and configure Metaflow.

    `profile` writes `config_<profile>.json` instead of `config.json` (under $METAFLOW_HOME,
    default ~/.metaflowconfig). `datastore_root` sets the local datastore folder
    (METAFLOW_DATASTORE_SYSROOT_LOCAL); by default Metaflow's own (.metaflow next to the flow).
    `datastore`: "auto" uses the stack's object store when it has one (else the local datastore),
    "s3" requires it, "local" keeps runs' data on this machine (the UI then shows no logs,
    artifacts or cards of those runs).
    """
    if datastore not in DATASTORES:
        raise ConfigError(f"unknown datastore {datastore!r}", hint="use 'auto', 's3' or 'local'")
    base_url, token = _resolve_input(connection, url, token, root)
    if profile is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", profile):
        raise BadConnectionString(f"not a usable profile name: {profile!r}",
                                  hint="use letters, digits, '-', '_' or '.'")
    check_stack(base_url, timeout=timeout)
    version = check_service(base_url, token, timeout=timeout)
    store = False
    if datastore != "local":
        store = check_object_store(base_url, token, timeout=timeout)
        if not store and datastore == "s3":
            raise NoObjectStore(f"the stack at {base_url} serves no object store (no {S3_ROUTE}/ route)",
                                hint="update the stack, or connect with datastore='local' (the UI then "
                                     "shows no logs, artifacts or cards of runs from this machine)")
    plan = plan_datastore(base_url, datastore_root, token=token, object_store=store)

    values = {
        "METAFLOW_DEFAULT_METADATA": "service",
        "METAFLOW_SERVICE_URL": f"{base_url}/service",
        "METAFLOW_SERVICE_AUTH_KEY": token,
        **plan.settings,
    }
    notes: list[str] = []
    user = run_user()
    if user is not None and not (write_profile and "METAFLOW_USER" in _read_profile(profile)):
        values["METAFLOW_USER"] = user
        notes.append(f"no user name in this environment ($USER is unset or root, which Metaflow refuses): "
                     f"runs are recorded as user {user!r} (METAFLOW_USER in the profile)")
    if not os.environ.get(CLIENT_CACHE_KEY):
        chosen = _read_profile(profile).get(CLIENT_CACHE_KEY) if write_profile else None
        if chosen:
            values[CLIENT_CACHE_KEY] = str(chosen)
        else:
            values[CLIENT_CACHE_KEY] = str(private_client_cache())
            notes.append(f"the Metaflow client caches artifacts in {values[CLIENT_CACHE_KEY]}, this user's "
                         "own (Metaflow's default /tmp/metaflow_client belongs to whoever used it first)")
    config_path: Path | None = None
    action = "not written"
    replaced: dict[str, str] = {}
    kept: tuple[str, ...] = ()
    if write_profile:
        config_path, action, replaced, kept = write_config(values, profile)
    if set_env:
        os.environ.update(values)
        if profile is not None:
            os.environ["METAFLOW_PROFILE"] = profile
        if "metaflow" in sys.modules:
            notes.append("metaflow was already imported in this process and keeps its old settings: "
                         "restart the kernel before using the client here (flows started as "
                         "`python flow.py run` pick the new settings up)")
    if profile is not None and not set_env:
        notes.append(f"select it with METAFLOW_PROFILE={profile}")
    notes.extend(missing_client_packages(plan.kind))
    return ConnectResult(base_url=base_url, service_url=f"{base_url}/service", service_version=version,
                         profile=profile, settings=values, config_path=config_path, config_action=action,
                         replaced=replaced, kept_keys=kept, env_set=set_env, datastore=plan,
                         notes=tuple(notes), connection_string=format_connection(base_url, token))


# Metaflow takes the first of these that is set and not "root" as the user who runs a flow.
_USER_VARIABLES = ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")
FALLBACK_USER = "notebook"
CLIENT_CACHE_KEY = "METAFLOW_CLIENT_CACHE_PATH"


def metaflow_user(environ: Mapping[str, str] | None = None) -> str | None:
    """The user name Metaflow finds in the environment, None if it finds none."""
    environ = os.environ if environ is None else environ
    return next((environ[name] for name in _USER_VARIABLES if environ.get(name) not in (None, "", "root")), None)


def run_user(environ: Mapping[str, str] | None = None) -> str | None:
    """The METAFLOW_USER to write when Metaflow would find no user name, else None.

    A root shell without $USER (Colab's) makes every run fail with "Unknown user".
    """
    if metaflow_user(environ) is not None:
        return None
    try:
        login = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        login = ""
    return login if login and login != "root" else FALLBACK_USER


def private_client_cache() -> Path:
    """A Metaflow client cache folder of this user's own (made 0700).

    Metaflow's default, /tmp/metaflow_client, is shared by every user of the machine and made by the
    first: a second user's client then fails to read any artifact (FileCacheException).
    """
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metaflow_client"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.chmod(0o700)
    except OSError as exc:
        raise ProfileError(f"cannot make the Metaflow client cache {folder}: {exc}",
                           hint=f"set {CLIENT_CACHE_KEY} to a folder this user can write") from exc
    return folder


def missing_client_packages(datastore: str) -> list[str]:
    """A warning for each package the Metaflow client needs here and this Python lacks."""
    needed = ["metaflow"] + (["boto3"] if datastore == "s3" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return []
    why = " and ".join(missing) + (" (Metaflow's S3 datastore client)" if "boto3" in missing else "")
    return [f"WARNING: this Python ({sys.executable}) lacks {why}: pip install {' '.join(needed)} "
            "(in a checkout of this project: pip install '.[client]')"]


def _resolve_input(connection: str | None, url: str | None, token: str | None,
                   root: str | Path | None) -> tuple[str, str]:
    if connection is not None and url is not None:
        raise BadConnectionString("give either a connection string or a URL and token, not both")
    if connection is not None:
        base, found = parse_connection(connection)
        if token is not None and token != found:
            raise BadConnectionString("the token given differs from the one in the connection string",
                                      hint="pass only the connection string")
        return base, found
    if url is not None:
        if "token=" in url and token is None:
            return parse_connection(url)
        if not token or not token.strip():
            raise BadConnectionString("a URL was given without an access token",
                                      hint="pass token=..., or the whole connection string")
        return normalise_base_url(url), token.strip()
    folder = Path(root).expanduser() if root is not None else _default_root()
    record = read_connection_file(folder)
    if record is None:
        raise BadConnectionString(f"no connection string given, and none found in {folder}/connection.json",
                                  hint="paste the line the stack printed: connect('https://<host>/?token=<token>')")
    return parse_connection(str(record["connection_string"]))


def _default_root() -> Path:
    from .settings import resolve
    return resolve().root


# ---------------------------------------------------------------- checks

def check_stack(base_url: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """GET /healthz: reachable, and answering like this stack's entry point. Returns its JSON."""
    response = _get(f"{base_url}/healthz", timeout=timeout, what=base_url)
    if response.status_code in (502, 503, 504, 530) and not isinstance(_json(response), dict):
        raise StackUnreachable(
            f"{base_url} answered HTTP {response.status_code} from something in front of the stack, "
            "not from the stack itself",
            hint="the tunnel is up but the stack behind it is not answering: check the service notebook "
                 "(python -m installer status) and restart the stack if it stopped")
    if response.is_redirect:
        target = response.headers.get("Location", "")
        better = target.removesuffix("/healthz")
        raise Redirected(f"{base_url} redirects to {target or 'another address'}",
                         hint=f"use {better} in the connection string" if better else
                         "use the address exactly as `up` printed it")
    body = _json(response)
    # 503 "degraded" is this stack too, with a part down: the checks after this one say which.
    ours = (response.status_code, body.get("status") if isinstance(body, dict) else None)
    if ours not in ((200, "ok"), (503, "degraded")):
        what = _describe(response)
        raise NotAStack(f"{base_url} is not a Metaflow stack of this kind: GET /healthz gave {what}",
                        hint="check the address: it is the line `up` printed (tunnel URL or "
                             "http://127.0.0.1:7860), not the address of another server")
    return body


def check_service(base_url: str, token: str, *, timeout: float = 10.0) -> str:
    """GET /service/ping with the token: the service's version, or the reason it is unusable."""
    response = _get(f"{base_url}/service/ping", timeout=timeout, what=base_url,
                    headers={"x-api-key": token})
    body = _json(response)
    if response.status_code == 401:
        raise WrongToken(f"{base_url} refused the access token (HTTP 401)"
                         + (f": {body['error']}" if isinstance(body, dict) and body.get("error") else ""),
                         hint="copy the connection string again from the service notebook "
                              "(python -m installer url); the token changes only when someone runs "
                              "`python -m installer rotate-token` on the stack")
    if response.status_code == 502:
        service = body.get("service") if isinstance(body, dict) else None
        raise ServiceDown(f"the stack at {base_url} is up, but its {service or 'metadata'} service is not "
                          "answering (HTTP 502)"
                          + (f": {body['error']}" if isinstance(body, dict) and body.get("error") else ""),
                          hint="look at the service notebook: python -m installer status, then "
                               "python -m installer logs metadata")
    if response.status_code != 200:
        raise NotAStack(f"{base_url}/service/ping gave {_describe(response)}, not the metadata service's answer",
                        hint="check the address is the one `up` printed")
    version = response.headers.get("METADATA_SERVICE_VERSION")
    if response.text.strip().strip('"') != "pong" or not version:
        raise NotAStack(f"{base_url}/service/ping did not answer like a Metaflow metadata service "
                        f"({_describe(response)}, version header {'present' if version else 'missing'})",
                        hint="check the address is the one `up` printed")
    parsed = _version_tuple(version)
    if parsed is None or parsed < MIN_SERVICE_VERSION:
        need = ".".join(map(str, MIN_SERVICE_VERSION))
        raise ServiceTooOld(f"the metadata service at {base_url} reports version {version!r}; "
                            f"the Metaflow client needs {need} or newer",
                            hint="upgrade the service image the stack runs (MF_SERVICE_IMAGE)")
    return version


def check_object_store(base_url: str, token: str, *, timeout: float = 10.0) -> bool:
    """A signed HeadBucket through `<base>/s3`: True if the store answers it, False if there is none.

    Raises ObjectStoreRefused when the store refuses the token's credentials, and
    ObjectStoreDown when the route exists but the store behind it does not answer.
    """
    parts = urlsplit(base_url)
    host = _host_header(parts.scheme, parts.netloc)
    path = f"{parts.path}{S3_ROUTE}/{S3_BUCKET}"
    headers = s3auth.sign_headers("HEAD", path, "", host, s3auth.credentials_for_token(token))
    headers["Host"] = host
    try:
        response = requests.head(f"{parts.scheme}://{parts.netloc}{path}", timeout=timeout, headers=headers,
                                 allow_redirects=False)
    except requests.RequestException as exc:
        raise _classify(exc, base_url, timeout) from exc
    if response.status_code == 200:
        return True
    s3_answer = "xml" in response.headers.get("Content-Type", "")
    if response.status_code == 403 and s3_answer:
        raise ObjectStoreRefused(f"the object store at {base_url}{S3_ROUTE} refused this token's S3 credentials "
                                 "(HTTP 403)",
                                 hint="the token may have been rotated just now: copy the connection string "
                                      "again (python -m installer url) and connect once more")
    if response.status_code in (502, 503, 504):
        raise ObjectStoreDown(f"the stack at {base_url} is up, but its object store is not answering "
                              f"(HTTP {response.status_code})",
                              hint="look at the service notebook: python -m installer status, then "
                                   "python -m installer logs objectstore; or connect with datastore='local'")
    if response.status_code == 404 and s3_answer:
        raise NoObjectStore(f"the object store at {base_url}{S3_ROUTE} has no bucket {S3_BUCKET!r}",
                            hint="restart the stack's object store (it creates the bucket at start)")
    return False


def _host_header(scheme: str, netloc: str) -> str:
    """The Host header requests will send (the signature covers it): no default port, lower case."""
    host = netloc.rsplit("@", 1)[-1].lower()
    return host.removesuffix(":80" if scheme == "http" else ":443")


def _version_tuple(text: str) -> tuple[int, ...] | None:
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    return tuple(int(part or 0) for part in match.groups())


def _get(url: str, *, timeout: float, what: str, headers: Mapping[str, str] | None = None) -> requests.Response:
    try:
        return requests.get(url, timeout=timeout, headers=dict(headers or {}), allow_redirects=False)
    except requests.RequestException as exc:
        raise _classify(exc, what, timeout) from exc


def _classify(exc: requests.RequestException, what: str, timeout: float) -> ConnectError:
    chain = _chain(exc)
    if any(isinstance(e, (urllib3.exceptions.NameResolutionError, socket.gaierror)) for e in chain):
        host = re.sub(r"^https?://", "", what).split("/")[0].split(":")[0]
        return NameNotResolved(f"cannot resolve the host name {host!r}",
                               hint="the quick tunnel's address changes whenever it restarts: copy the "
                                    "current connection string from the service notebook; check for typos")
    if any(isinstance(e, (requests.exceptions.SSLError, ssl.SSLError)) for e in chain):
        return TLSFailed(f"TLS handshake with {what} failed: {_innermost(chain)}",
                         hint="use http:// for a stack on this machine (http://127.0.0.1:7860) and https:// "
                              "for a tunnel address; a certificate error means another server answers there")
    if any(isinstance(e, (requests.exceptions.Timeout, socket.timeout, TimeoutError)) for e in chain):
        return ConnectTimedOut(f"{what} did not answer within {timeout:g} s",
                               hint="the stack or its tunnel may be overloaded or stuck: check the service "
                                    "notebook, then try again (or pass a longer timeout)")
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return ConnectionRefused(f"connection to {what} refused: nothing listens there",
                                 hint="the stack is not running on that port: start it with "
                                      "python -m installer up, or check the port in the address")
    return Unreachable(f"cannot reach {what}: {_innermost(chain)}",
                       hint="check the address and this machine's network access")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 20:
        current = pending.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        for inner in (getattr(current, "reason", None), current.__cause__, current.__context__,
                      *(a for a in current.args if isinstance(a, BaseException))):
            if isinstance(inner, BaseException):
                pending.append(inner)
    return seen


def _innermost(chain: list[BaseException]) -> str:
    text = str(chain[-1]) if chain else ""
    return text if len(text) < 300 else text[:300] + "..."


def _json(response: requests.Response) -> Any:
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _describe(response: requests.Response) -> str:
    kind = response.headers.get("Content-Type", "no content type").split(";")[0]
    return f"HTTP {response.status_code} ({kind})"


# ---------------------------------------------------------------- datastore

_UI_ALWAYS = ("the list of flows, runs, steps and tasks", "run and task status, timings, tags and the DAG")


def s3_settings(endpoint_url: str, root: str, token: str | None) -> dict[str, str]:
    """The METAFLOW_* values for the S3 datastore at `endpoint_url`.

    The credentials go in METAFLOW_DATATOOLS_CLIENT_PARAMS: keyword arguments Metaflow passes to
    boto3's client() (from the environment or the profile, in its s3op worker processes too), so
    a profile alone is enough and no AWS profile or AWS_* variable of this machine is touched.
    """
    settings = {
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": root,
        "METAFLOW_S3_ENDPOINT_URL": endpoint_url,
    }
    if token is not None:
        credentials = s3auth.credentials_for_token(token)
        settings["METAFLOW_DATATOOLS_CLIENT_PARAMS"] = json.dumps({
            "aws_access_key_id": credentials.access_key_id,
            "aws_secret_access_key": credentials.secret_access_key,
            "region_name": s3auth.REGION,
        }, sort_keys=True)
    return settings


def plan_datastore(base_url: str, datastore_root: str | Path | None = None, *, token: str | None = None,
                   object_store: bool = False) -> DatastorePlan:
    """Which datastore runs from this machine use.

    `object_store`: the stack answered a signed request on `<base>/s3` (check_object_store).
    Otherwise runs keep their data on this machine's disk.
    """
    if object_store:
        settings = s3_settings(f"{base_url}{S3_ROUTE}", S3_ROOT, token)
        return DatastorePlan(
            kind="s3", settings=settings,
            ui_shows=_UI_ALWAYS + ("logs", "artifacts", "cards"), ui_misses=(),
            statement="Runs from this machine store their data in the stack's object store: the UI shows "
                      "their runs, steps, tasks and status, and also their logs, artifacts and cards.")
    settings = {"METAFLOW_DEFAULT_DATASTORE": "local"}
    if datastore_root is not None:
        settings["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(Path(datastore_root).expanduser().resolve())
    return DatastorePlan(
        kind="local", settings=settings, ui_shows=_UI_ALWAYS, ui_misses=("logs", "artifacts", "cards"),
        statement="Runs from this machine keep their data on this machine's disk (local datastore): the "
                  "stack's UI shows their runs, steps, tasks and status, but NOT their logs, artifacts or "
                  "cards, which stay on this machine and are lost with it.")


# ---------------------------------------------------------------- config profile

def config_path(profile: str | None = None) -> Path:
    home = Path(os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR).expanduser()
    return home / (f"config_{profile}.json" if profile else "config.json")


def write_config(values: Mapping[str, str], profile: str | None = None
                 ) -> tuple[Path, str, dict[str, str], tuple[str, ...]]:
    """Merge `values` into the Metaflow config file; (path, action, replaced, kept keys).

    Keys already there and not ours are kept; ours overwrite, and the result says which changed.
    """
    path = config_path(profile)
    existing = _read_profile(profile)
    replaced = {key: _mask(key, str(existing[key])) for key, value in values.items()
                if key in existing and existing[key] != value}
    kept = tuple(sorted(key for key in existing if key not in values))
    if path.exists() and not replaced and all(key in existing for key in values):
        return path, "unchanged", {}, kept
    action = "updated" if path.exists() else "created"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_private_json(path, {**existing, **values})
    except OSError as exc:
        raise ProfileError(f"cannot write {path}: {exc}", hint="check the folder is writable") from exc
    return path, action, replaced, kept


def _read_profile(profile: str | None) -> dict[str, Any]:
    """The Metaflow config file's keys ({} when there is none); refuses one it could not merge into."""
    path = config_path(profile)
    if not path.exists():
        return {}
    try:
        existing = json.loads(path.read_text() or "{}")
    except (OSError, ValueError) as exc:
        raise ProfileError(f"cannot merge into {path}: it is not readable JSON ({exc})",
                           hint=f"fix or move {path} away, or pass another profile name") from exc
    if not isinstance(existing, dict):
        raise ProfileError(f"cannot merge into {path}: it does not hold a JSON object",
                           hint=f"fix or move {path} away, or pass another profile name")
    return existing


def _mask(key: str, value: str) -> str:
    if "KEY" in key or "SECRET" in key or "TOKEN" in key or "CLIENT_PARAMS" in key:
        return value[:4] + "..." if len(value) > 8 else "***"
    return value
