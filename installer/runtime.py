"""Containers without Docker: udocker, with its own engine or Debian's proot.

udocker keeps images and containers as plain folders under UDOCKER_DIR and runs
a container as an ordinary process tree (proot -> the guest), so a service is a
long-lived `udocker run` started detached by the stack, in a process that becomes
proot once udocker has set it up (installer/udocker_exec.py). This module knows
udocker's command line and folder layout; nothing else does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from urllib.parse import urlsplit

import requests

from . import procs
from .errors import ImageError, RuntimeUnavailable, StackError
from .pulls import (DEFAULT_MIRRORS, PARALLEL_LAYERS, Located, Source, fetch_layers, front_url, locate,
                    loopback_registry, parse_source)
from .registry import Credentials, network_reason
from .transfer import Meter

Progress = Callable[[str], None]

EXECUTION_MODE = "P1"
SYSTEM_PROOT = "/usr/bin/proot"
# Debian's proot 5.1 fails on the `-k <kernel>` option that udocker always passes;
# this wrapper drops that pair and hands everything else to the real proot.
_PROOT_WRAPPER = """#!/bin/sh
# Drops udocker's "-k <kernel>" option, which Debian's proot cannot handle.
skip=0
for arg do
  shift
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  if [ "$arg" = "-k" ]; then skip=1; continue; fi
  set -- "$@" "$arg"
done
exec {proot} "$@"
"""
_READY_MARK = ".mfstack-ready"


@dataclass(frozen=True)
class Udocker:
    """udocker, rooted at one folder, with the environment that makes it work here."""

    home: Path
    engine_env: Mapping[str, str]

    @property
    def env(self) -> dict[str, str]:
        return {"UDOCKER_DIR": str(self.home), "UDOCKER_DEFAULT_EXECUTION_MODE": EXECUTION_MODE,
                **self.engine_env}

    def command(self, *args: str) -> list[str]:
        # udocker refuses to run as root (Colab's user) unless told first.
        return [udocker_executable(), "--allow-root", *args]

    def run(self, *args: str, what: str, hint: str | None = None, timeout: float | None = 600,
            check: bool = True) -> str:
        return procs.run(self.command(*args), env=self.env, timeout=timeout, what=what, hint=hint,
                         check=check).stdout

    # --- images -------------------------------------------------------------

    def has_image(self, ref: str) -> bool:
        wanted = image_spec(ref).local_name
        name, _, tag = wanted.rpartition(":")
        if name and "@" not in wanted and "/" not in tag:
            # What `udocker images` lists: each repos/<name>/<tag> folder holding a TAG file. Read
            # directly, as udocker would, without starting a udocker (0.3 s) for each image, each `up`.
            return (self.home / "repos" / name / tag / "TAG").is_file()
        out = self.run("images", what="udocker images", check=False)
        return any(line.split()[0] == wanted for line in out.splitlines()[1:] if line.split())

    def pull(self, ref: str, registry: str | None, progress: Progress, *, mirrors: Sequence[str] = DEFAULT_MIRRORS,
             credentials: Credentials | None = None) -> bool:
        """Pull `ref` unless present; True if it was pulled now."""
        return bool(self.pull_all([ref], registry, progress, mirrors=mirrors, credentials=credentials))

    def pull_all(self, refs: Sequence[str], registry: str | None, progress: Progress, *,
                 mirrors: Sequence[str] = DEFAULT_MIRRORS, credentials: Credentials | None = None,
                 parallel: int = PARALLEL_LAYERS) -> list[Located]:
        """Pull every image of `refs` not present yet; where each one came from.

        `registry` (the --registry setting) serves every reference's path, whatever registry the
        reference names; without it, Docker Hub references are asked of `mirrors` in order.
        """
        missing = [ref for ref in dict.fromkeys(refs) if not self.has_image(ref)]
        found = []
        for ref in missing:
            path, tag, sources = image_sources(ref, registry, mirrors)
            progress(f"looking for {ref} in {', '.join(s.label for s in sources)}")
            found.append(locate(ref, path, tag, sources, credentials))
            progress(f"found {found[-1].describe()}")
        if not found:
            return []
        fetch_layers(found, self.home / "layers", progress, parallel)
        # udocker takes each image from a loopback registry that serves what was just fetched.
        with loopback_registry(self.home / "layers") as front:
            for item in found:
                front.current = item.manifest
                errors: list[str] = []

                def on_line(line: str) -> None:
                    if line.lstrip().startswith("Error:"):
                        errors.append(line)

                spec = image_spec(item.ref)
                try:
                    procs.stream(self.command("pull", f"--registry={front_url(front)}", spec.local_name), on_line,
                                 env={**self.env, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"},
                                 timeout=1800, what=f"storing {item.ref} in udocker")
                except StackError as exc:
                    raise ImageError(f"could not store {item.ref} in udocker after downloading it",
                                     log_tail=clean_pull_errors(errors) or None,
                                     hint="check free disk space under UDOCKER_DIR, then run `up` again") from exc
                if not self.has_image(item.ref):
                    raise ImageError(f"udocker did not keep {item.ref} after downloading it",
                                     log_tail=clean_pull_errors(errors) or None,
                                     hint="check free disk space under UDOCKER_DIR, then run `up` again")
        return found

    # --- containers ---------------------------------------------------------

    def container_dir(self, name: str) -> Path:
        return self.home / "containers" / name

    def container_root(self, name: str) -> Path:
        """The container's file system as seen from the host."""
        return self.container_dir(name) / "ROOT"

    def has_container(self, name: str) -> bool:
        return (self.container_dir(name) / _READY_MARK).exists()

    def ensure_container(self, ref: str, name: str, progress: Progress) -> bool:
        """Create container `name` from image `ref` unless it exists; True if created now."""
        if self.has_container(name):
            return False
        if self.container_dir(name).exists():
            # A creation that was interrupted: start again from a clean slate.
            self.run("rm", "-f", name, what=f"removing the incomplete container {name}", check=False)
            shutil.rmtree(self.container_dir(name), ignore_errors=True)
        progress(f"creating container {name} from {ref}")
        with _unpacking(self.home, self._unpacked_size(ref), progress):
            self.run("create", f"--name={name}", image_spec(ref).local_name, what=f"creating container {name}",
                     hint="check free disk space under UDOCKER_DIR")
        self.run("setup", f"--execmode={EXECUTION_MODE}", name, what=f"configuring container {name}")
        (self.container_dir(name) / _READY_MARK).write_text(ref + "\n")
        return True

    def _unpacked_size(self, ref: str) -> int:
        """The image's unpacked size, from each gzip layer's trailer (0 when a layer says nothing)."""
        name, _, tag = image_spec(ref).local_name.rpartition(":")
        folder = self.home / "repos" / name / tag
        try:
            layers = [folder / item["digest"] for item in json.loads((folder / "manifest").read_text())["layers"]]
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        total = 0
        for layer in layers:
            try:
                with open(layer, "rb") as handle:
                    if handle.read(2) != b"\x1f\x8b":
                        return 0
                    handle.seek(-4, os.SEEK_END)
                    total += int.from_bytes(handle.read(4), "little")  # ISIZE: the size modulo 4 GiB
            except OSError:
                return 0
        return total

    def run_argv(self, container: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 volumes: Sequence[tuple[Path, str]] = (), workdir: str | None = None,
                 env_file: Path | None = None) -> list[str]:
        """The command line that runs `argv` inside `container` (for procs.spawn).

        Secrets go in `env_file` (0600) so that they show neither in `ps` nor in logs.
        """
        # --containerauth: the container's own users (root, postgres), and no temporary passwd files.
        args = ["run", "--nobanner", "--containerauth", "--user=root"]
        if env_file:
            args.append(f"--env-file={env_file}")
        if workdir:
            args.append(f"--workdir={workdir}")
        for host, guest in volumes:
            args.append(f"--volume={host}:{guest}")
        for key, value in (env or {}).items():
            args.append(f"--env={key}={value}")
        if importlib.util.find_spec("udocker") is None:  # udocker installed for another Python
            return self.command(*args, container, *argv)
        # udocker's own command line, in a process that becomes proot rather than waiting for it.
        return [sys.executable, "-m", "installer.udocker_exec", "--allow-root", *args, container, *argv]


@contextmanager
def _unpacking(home: Path, total: int, progress: Progress, every: float = 1.0) -> Iterator[None]:
    """Progress of `udocker create`: bytes appearing in the new container's folder against `total`."""
    before = set(os.listdir(home / "containers")) if (home / "containers").is_dir() else set()
    done = threading.Event()
    meter = Meter("unpacking", total, progress, every=0.0)

    def watch() -> None:
        while not done.wait(every):
            fresh = [home / "containers" / n for n in os.listdir(home / "containers") if n not in before] \
                if (home / "containers").is_dir() else []
            size = sum(_tree_size(path) for path in fresh if not path.is_symlink())
            meter.add(max(0, min(size, total) - meter.done))

    watcher = threading.Thread(target=watch, name="mfstack-unpacking", daemon=True)
    if total:
        watcher.start()
    try:
        yield
    finally:
        done.set()
        if total:
            watcher.join(timeout=5)
    if total:
        meter.finish()


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def container_name(service: str, ref: str) -> str:
    """A container per image: a new image reference gets a fresh container."""
    digest = hashlib.sha256(ref.encode()).hexdigest()[:10]
    return f"mfstack-{service}-{digest}"


def udocker_executable() -> str:
    beside = Path(sys.executable).parent / "udocker"
    if beside.exists():
        return str(beside)
    found = shutil.which("udocker")
    if not found:
        raise RuntimeUnavailable("udocker is not installed",
                                 hint="pip install udocker (it comes with this package's dependencies)")
    return found


def prepare(udocker_dir: Path, bin_dir: Path, progress: Progress) -> Udocker:
    """A working udocker: its own engine when it installs, else the system proot."""
    try:
        udocker_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeUnavailable(f"cannot create the udocker folder {udocker_dir}: {exc.strerror}",
                                 hint="set UDOCKER_DIR (or --udocker-dir) to a writable folder on local disk") from exc
    if os.environ.get("UDOCKER_USE_PROOT_EXECUTABLE"):
        return Udocker(udocker_dir, {"UDOCKER_USE_PROOT_EXECUTABLE": os.environ["UDOCKER_USE_PROOT_EXECUTABLE"]})
    own = Udocker(udocker_dir, {})
    if _own_engine_installed(udocker_dir):
        return own
    wrapper = bin_dir / "proot-udocker"
    if wrapper.exists():
        # Chosen on an earlier start: do not wait on a download that failed before.
        return Udocker(udocker_dir, {"UDOCKER_USE_PROOT_EXECUTABLE": str(wrapper), "UDOCKER_TARBALL": ""})
    progress("installing udocker's engine")
    done = procs.run(own.command("install"), env=own.env, timeout=300, check=False)
    if done.returncode == 0 and _own_engine_installed(udocker_dir):
        return own
    proot = shutil.which("proot") or (SYSTEM_PROOT if os.path.exists(SYSTEM_PROOT) else None)
    if not proot:
        raise RuntimeUnavailable(
            "udocker's engine could not be installed (no internet?) and no system proot was found",
            log_tail="\n".join(done.stdout.strip().splitlines()[-5:]) or None,
            hint="install proot (apt-get install -y proot) or give udocker internet access once")
    progress(f"udocker's own engine is unavailable; using the system proot ({proot})")
    bin_dir.mkdir(parents=True, exist_ok=True)
    text = _PROOT_WRAPPER.format(proot=proot)
    if not wrapper.exists() or wrapper.read_text() != text:
        tmp = wrapper.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(wrapper)
    return Udocker(udocker_dir, {"UDOCKER_USE_PROOT_EXECUTABLE": str(wrapper), "UDOCKER_TARBALL": ""})


def _own_engine_installed(udocker_dir: Path) -> bool:
    return any((udocker_dir / "bin").glob("proot-*"))


LOCAL_REGISTRY_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local_registry.sh"


def local_registry(registry: str | None, verb: str) -> str | None:
    """Run scripts/local_registry.sh `verb` (status or stop) for a loopback `registry`; its answer.

    None when there is nothing of ours to ask about: no registry, a remote one, or an
    installation without the project's scripts (only they start a local registry).
    """
    if not registry:
        return None
    parts = urlsplit(registry)
    if parts.hostname not in ("127.0.0.1", "localhost") or not LOCAL_REGISTRY_SCRIPT.is_file():
        return None
    done = procs.run(["bash", str(LOCAL_REGISTRY_SCRIPT), verb], timeout=30, check=False,
                     env={"MFSTACK_REGISTRY_PORT": str(parts.port or 80)})
    lines = [line.removeprefix("local_registry: ").removeprefix("ERROR: ") for line in done.stdout.splitlines()]
    return lines[-1] if lines else None


def check_registry(registry: str) -> None:
    """Fail early, and clearly, when a custom registry does not answer."""
    try:
        answer = requests.get(f"{registry}/v2/", timeout=5)
    except requests.RequestException as exc:
        raise ImageError(f"the registry {registry} is not answering ({network_reason(exc)})",
                         hint="start it (`bash scripts/local_registry.sh start`; `bash scripts/offline_up.sh` "
                              "does it for you) or check --registry (MF_REGISTRY)") from exc
    if answer.status_code not in (200, 401):
        raise ImageError(f"{registry} does not look like an image registry (HTTP {answer.status_code} on /v2/)",
                         hint="check --registry")


_DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class ImageSpec:
    """An image reference as udocker stores and pulls it."""

    local_name: str  # `repository:tag`, as `udocker images` lists it and as it is pulled
    registry: str | None  # the registry the reference names (None: Docker Hub)


def image_spec(ref: str) -> ImageSpec:
    """How udocker knows `ref`: every spelling of one Docker Hub image gets one local name.

    udocker keeps an image under the name it was pulled by (`postgres:15`, never
    `library/postgres:15`; it adds `library/` only on the remote path), and it cannot parse a
    registry host with a port (`host:5000/team/img` splits at the first colon). So a registry
    host is moved out of the name into --registry, Docker Hub's own names are dropped, and
    a missing tag is `latest`.
    """
    name, tag = ref, "latest"
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = ref[:len(ref) - len(last)] + last.split(":", 1)[0], last.split(":", 1)[1]
    parts = name.split("/")
    registry = None
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        host = parts.pop(0)
        if host not in _DOCKER_HUB_HOSTS:
            registry = f"https://{host}"
    if not parts or not all(parts) or not tag:
        raise ImageError(f"not an image reference: {ref!r}",
                         hint="use name:tag, team/name:tag or registry.example/team/name:tag")
    if registry is None and len(parts) == 2 and parts[0] == "library":
        parts.pop(0)
    return ImageSpec(f"{'/'.join(parts)}:{tag}", registry)


def image_sources(ref: str, registry: str | None, mirrors: Sequence[str]) -> tuple[str, str, list[Source]]:
    """(repository path, tag, registries to ask in order) for `ref`.

    --registry serves every reference alone; a reference that names its registry is pulled
    from there; a Docker Hub reference is asked of the mirrors list, Docker Hub's own names
    with `library/` for one-part names as registries store them.
    """
    spec = image_spec(ref)
    name, tag = spec.local_name.rsplit(":", 1)
    path = name if "/" in name else f"library/{name}"
    if registry:
        return path, tag, [Source(registry, registry)]
    if spec.registry:
        return path, tag, [Source(spec.registry.split("://", 1)[1], spec.registry)]
    try:
        sources = [parse_source(entry) for entry in mirrors]
    except ValueError as exc:
        raise ImageError(str(exc), hint="check --mirrors (MF_MIRRORS)") from None
    if not sources:
        raise ImageError(f"no registry to pull {ref} from", hint="set --mirrors (MF_MIRRORS), e.g. docker.io")
    return path, tag, sources


def check_sources(mirrors: Sequence[str], timeout: float = 5.0) -> None:
    """Fail early, and clearly, when none of the registries can be reached (no internet, a firewall)."""
    sources = [parse_source(entry) for entry in mirrors]
    reasons: list[str] = []
    for source in sources:
        try:
            requests.get(f"{source.url}/v2/", timeout=timeout)
            return
        except requests.RequestException as exc:
            label = f"Docker Hub ({source.url})" if source.url == DOCKER_HUB_REGISTRY else source.label
            reasons.append(f"{label} cannot be reached ({network_reason(exc)})")
    raise ImageError("; ".join(reasons), hint=_OFFLINE_HINT)


DOCKER_HUB_REGISTRY = "https://registry-1.docker.io"
_MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"))


def check_docker_hub(timeout: float = 5.0) -> None:
    """Fail early, and clearly, when Docker Hub cannot be reached (no internet, a firewall)."""
    try:
        requests.get(f"{DOCKER_HUB_REGISTRY}/v2/", timeout=timeout)
    except requests.RequestException as exc:
        raise ImageError(f"Docker Hub ({DOCKER_HUB_REGISTRY}) cannot be reached ({network_reason(exc)})",
                         hint=_OFFLINE_HINT) from exc


def check_image_in_registry(registry: str, ref: str, timeout: float = 5.0) -> None:
    """Fail when `registry` answers that it has no image `ref`; an answer that needs a login passes."""
    name, tag = image_spec(ref).local_name.rsplit(":", 1)
    # udocker asks a registry for one-part names under library/, as Docker Hub stores them.
    remote = name if "/" in name else f"library/{name}"
    try:
        answer = requests.head(f"{registry}/v2/{remote}/manifests/{tag}", timeout=timeout,
                               headers={"Accept": _MANIFEST_TYPES})
    except requests.RequestException as exc:
        raise ImageError(f"the registry {registry} did not answer for {ref} ({network_reason(exc)})",
                         hint="check --registry") from exc
    if answer.status_code == 404:
        raise ImageError(f"image {ref} is not in {registry} (no {remote}:{tag} there)",
                         hint=_pull_hint(ref, registry))


def clean_pull_errors(lines: Sequence[str]) -> str:
    """udocker's error lines once each, without its unfilled `%s` placeholders."""
    cleaned = [" ".join(line.replace("%s", " ").split()) for line in lines]
    return "\n".join(dict.fromkeys(line for line in cleaned if line))


_OFFLINE_HINT = ("without internet, run `bash scripts/offline_up.sh` (it builds the images and serves them "
                 "from a local registry), or pull from a registry you can reach with --registry URL "
                 "(MF_REGISTRY)")


def _pull_hint(ref: str, registry: str | None) -> str:
    if registry:
        return (f"check that {ref} was pushed to {registry} "
                "(scripts/build_images.sh builds and pushes the local images)")
    return f"check the image reference and this machine's internet access; {_OFFLINE_HINT}"
