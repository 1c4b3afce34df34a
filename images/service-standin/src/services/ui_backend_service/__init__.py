"""UI backend stand-in (see ui_server.py)."""
