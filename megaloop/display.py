"""How megaloop writes a duration for people: `1h02m`, `2m10s`, `7s`; beyond two days in days,
beyond a year in years (a plan's estimate on too small a machine)."""

from __future__ import annotations

DAY, YEAR = 86400, 365 * 86400


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 130 -> '2m10s', 7 -> '7s' (negative: 0s); 3 days -> '3.0 days',
    40 years -> '40 years'."""
    seconds = max(0, round(seconds))
    if seconds >= YEAR:
        return f"{seconds / YEAR:,.0f} years"
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:.1f} days"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
