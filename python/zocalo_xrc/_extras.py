"""Optional parts of the package: one that is missing is an ImportError
naming the extra that installs it, not a bare ``No module named ...``."""

from __future__ import annotations

import importlib.util


def require(part: str, extra: str, *modules: str) -> None:
    """Raise :class:`ImportError` saying ``part`` needs the ``extra`` if any
    of ``modules`` cannot be found (without importing them)."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            raise ImportError(f"{part} needs {module}, which is not installed: pip install 'zocalo-xrc[{extra}]'",
                              name=module)
