"""How megaloop writes a duration for people: `1h02m`, `2m10s`, `7s`."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 130 -> '2m10s', 7 -> '7s' (negative: 0s)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
