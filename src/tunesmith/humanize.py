"""Numbers as people read them: counts with the right plural, durations in minutes and hours,
metrics without sixteen digits. One owner, so every command says "1 error" and "3 min 20 s"
the same way.
"""

from __future__ import annotations

import math


def plural(count: int, word: str, word_plural: str | None = None) -> str:
    """`1 error`, `2 errors`, `0 errors`; `word_plural` for the irregular ones."""
    return f"{count:,} {word if count == 1 else (word_plural or word + 's')}"


def duration_text(seconds: float) -> str:
    """A duration in human units: `45 s`, `3 min 20 s`, `1 h 05 min`, `2 d 04 h`.

    Two units at most: an estimate is not precise to the second once it runs into hours.
    """
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    total = round(seconds)
    if total < 60:
        return f"{total} s"
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes} min {secs:02d} s" if secs else f"{minutes} min"
    total_minutes = round(seconds / 60)
    if total_minutes < 24 * 60:
        hours, minutes = divmod(total_minutes, 60)
        return f"{hours} h {minutes:02d} min"
    total_hours = round(seconds / 3600)
    days, hours = divmod(total_hours, 24)
    return f"{days} d {hours:02d} h"


def number_text(value: object) -> str:
    """A metric or config value for a table: floats to 4 decimals (tiny ones in e-notation,
    large ones with thousands separators), everything else as itself."""
    if isinstance(value, bool) or not isinstance(value, float):
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.4f}"
