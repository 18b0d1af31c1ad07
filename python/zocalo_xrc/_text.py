"""How error messages quote bad values: briefly, whatever their size."""

import json
from pathlib import Path
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
    except ValueError:  # an int too long for repr (a float's repr never fails)
        return f"an integer of {int(value).bit_length()} bits"


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


def read_json(path: Path, error: type[ValueError]) -> Any:
    """A JSON file's content; ``error`` naming the file and what is wrong
    with its text (an ``OSError`` if it cannot be read)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
