"""The worked 2D and 3D cases the core must reproduce bit for bit.

``tests/data/xrc-vectors.json`` is the project's own copy of the contract's
vectors: a clone needs nothing beside it to run its tests."""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def vectors() -> dict:
    return json.loads((DATA / "xrc-vectors.json").read_text())
