"""Numbers as a person reads them: sizes, durations, ages. Shared by every renderer."""

from __future__ import annotations


def size(count: float) -> str:
    """Bytes in decimal units: 512 bytes, 3.4 MB."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def duration(seconds: float) -> str:
    """A span of time: 4.2 s, 3 min 07 s, 2 h 05 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {(whole % 3600) // 60:02d} min"


def age(seconds: float) -> str:
    """How long ago: 12 s ago, 4 min ago, 1.5 h ago."""
    whole = max(0, int(seconds))
    if whole < 90:
        return f"{whole} s ago"
    if whole < 5400:
        return f"{round(whole / 60)} min ago"
    return f"{whole / 3600:.1f} h ago"
