"""How error messages quote bad values: briefly, whatever their size."""

from typing import Any

#: How many characters of a bad value an error message quotes at most (as the core's).
QUOTED_CHARS = 40


def quoted(value: Any) -> str:
    """``repr(value)``, cut to its beginning and its length when long, so that
    a huge input never makes a huge message."""
    text = repr(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else _number(value)
    if len(text) <= QUOTED_CHARS:
        return text
    return f"{text[:QUOTED_CHARS - 8]}... ({len(text)} characters)"


def _number(value: int | float) -> str:
    try:
        return repr(value)
    except ValueError:  # an int too long for repr
        return f"an integer of {value.bit_length()} bits"


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None: not a real number, not finite,
    or too large for a float (an int of 400 digits)."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None
