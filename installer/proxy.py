"""`python -m installer.proxy`: the stack's entry point, implemented in installer/edge/ (see its server.py)."""

from __future__ import annotations

import sys

from .edge.access import API_KEY_HEADER, COOKIE_NAME, cookie_value
from .edge.config import ProxyConfig
from .edge.server import build_app, main, serve

__all__ = ["API_KEY_HEADER", "COOKIE_NAME", "ProxyConfig", "build_app", "cookie_value", "main", "serve"]

if __name__ == "__main__":
    sys.exit(main())
