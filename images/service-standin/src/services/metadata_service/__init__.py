"""Metadata API stand-in (see server.py)."""
