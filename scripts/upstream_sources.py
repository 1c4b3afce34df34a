#!/usr/bin/env python3
"""Fetch and verify the upstream archives the service image is built from.

    python3 scripts/upstream_sources.py DEST [--mirror DIR]

Each archive listed in images/metaflow-service/upstream.json is taken from the
mirror folder when one is given (an air-gapped user's copy, or this project's
CI mirror), else downloaded from its pinned release URL. Either way it is
verified before it is copied into DEST: its sha256 must match, or its content
digest must (GitHub regenerates tag archives, so their bytes can change while
the files in them do not). Nothing unverified ever reaches a build.

Standard library only: it runs before the project's virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

PINS = Path(__file__).resolve().parent.parent / "images" / "metaflow-service" / "upstream.json"


def content_digest(path: Path) -> str:
    """sha256 over the sorted (member path, member sha256) pairs of a tar or zip archive."""
    rows: list[tuple[str, str]] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    rows.append((info.filename, hashlib.sha256(archive.read(info)).hexdigest()))
    else:
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                if member.isfile():
                    handle = archive.extractfile(member)
                    assert handle is not None
                    rows.append((member.name, hashlib.sha256(handle.read()).hexdigest()))
    digest = hashlib.sha256()
    for name, member_sha in sorted(rows):
        digest.update(f"{name}\0{member_sha}\n".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, pin: dict) -> str:
    """'sha256' or 'content' for the check that matched; raises ValueError otherwise."""
    actual = file_sha256(path)
    if actual == pin["sha256"]:
        return "sha256"
    try:
        content = content_digest(path)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path.name}: sha256 {actual} is not the pinned {pin['sha256']}, "
                         f"and it is not a readable archive ({exc})") from None
    if content == pin["content_sha256"]:
        return "content"
    raise ValueError(f"{path.name}: neither its sha256 ({actual}) nor its content digest ({content}) "
                     f"matches the pins in {PINS.name} (sha256 {pin['sha256']}, content {pin['content_sha256']})")


def download(url: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as answer, open(target, "wb") as out:
        shutil.copyfileobj(answer, out)


def fetch(dest: Path, mirror: Path | None) -> list[str]:
    pins = {key: value for key, value in json.loads(PINS.read_text()).items() if not key.startswith("_")}
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, pin in pins.items():
        target = dest / pin["file"]
        if target.is_file():
            try:
                verify(target, pin)
                lines.append(f"{pin['file']}: already verified in {dest}")
                continue
            except ValueError:
                target.unlink()
        with tempfile.TemporaryDirectory(dir=dest) as scratch:
            candidate = Path(scratch) / pin["file"]
            if mirror is not None:
                source = mirror / pin["file"]
                if not source.is_file():
                    raise SystemExit(f"error: {source} is missing; the mirror folder must hold {pin['file']} "
                                     f"(upstream release: {pin['url']})")
                shutil.copyfile(source, candidate)
                origin = str(source)
            else:
                try:
                    download(pin["url"], candidate)
                except OSError as exc:
                    raise SystemExit(f"error: could not download {pin['url']} ({exc}); without internet, "
                                     "point MFSTACK_UPSTREAM_DIR at a folder holding the upstream archives") from None
                origin = pin["url"]
            try:
                how = verify(candidate, pin)
            except ValueError as exc:
                raise SystemExit(f"error: {origin} failed verification: {exc}") from None
            candidate.replace(target)
        lines.append(f"{pin['file']} ({name}): {how} verified, from {origin}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to put the verified archives in")
    parser.add_argument("--mirror", type=Path, help="folder holding the archives (default: download them)")
    args = parser.parse_args(argv)
    for line in fetch(args.dest, args.mirror):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
