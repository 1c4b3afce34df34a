"""The UI bundle: files under one folder, never outside it, client-side routes falling back to index.html."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from .pages import json_error

__all__ = ["StaticFiles"]

_IMMUTABLE = "public, max-age=31536000, immutable"
# A missing file under these suffixes is a 404, not the UI's index.html.
_ASSET_SUFFIXES = frozenset({".js", ".mjs", ".css", ".map", ".json", ".png", ".jpg", ".jpeg", ".gif",
                             ".svg", ".ico", ".webp", ".woff", ".woff2", ".ttf", ".otf", ".eot", ".txt",
                             ".wasm", ".webmanifest", ".xml"})


def _plain_route(path: str) -> bool:
    """True for a path that may stand for a client-side route (no traversal or encoding tricks)."""
    lowered = path.lower()
    if "\\" in path or "%2f" in lowered or "%5c" in lowered or "%00" in lowered or "%2e" in lowered:
        return False
    return all(part not in (".", "..") for part in path.split("/"))


class StaticFiles:
    def __init__(self, folder: Path) -> None:
        self.root = Path(folder).resolve()

    def resolve(self, path: str) -> Path | None:
        """The file under the root for a raw request path, or None. Never leaves the root."""
        lowered = path.lower()
        if "\\" in path or "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
            return None
        segments = []
        for part in path.split("/"):
            if not part:
                continue
            name = unquote(part, errors="strict")
            if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
                return None
            segments.append(name)
        candidate = self.root.joinpath(*segments) if segments else self.root
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if resolved != self.root and self.root not in resolved.parents:
            return None  # a symlink pointing out of the bundle
        if resolved.is_dir():
            resolved = resolved / "index.html"
            if not resolved.is_file():
                return None
        return resolved if resolved.is_file() else None

    async def serve(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return json_error(405, f"{request.method} is not allowed on the UI")
        try:
            found = self.resolve(path)
        except UnicodeDecodeError:
            found = None
        if found is None:
            last = path.rsplit("/", 1)[-1]
            if not _plain_route(path) or path.startswith("/static/") \
                    or Path(unquote(last)).suffix.lower() in _ASSET_SUFFIXES:
                return json_error(404, "not found")
            found = self.root / "index.html"
            if not found.is_file():
                return json_error(404, "the UI bundle has no index.html")
        immutable = path.startswith("/static/") and found.name != "index.html"
        headers = {"Cache-Control": _IMMUTABLE if immutable else "no-cache",
                   "X-Content-Type-Options": "nosniff"}
        return web.FileResponse(found, headers=headers)
