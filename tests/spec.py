"""Where the project's contract lives: ../shared/spec, or $ZOCALO_XRC_SPEC."""

import json
import os
from pathlib import Path

SPEC = Path(os.environ.get("ZOCALO_XRC_SPEC", Path(__file__).resolve().parents[2] / "shared" / "spec"))


def vectors() -> dict:
    path = SPEC / "xrc-vectors.json"
    if not path.exists():
        raise FileNotFoundError(f"spec vectors not found at {path}; set ZOCALO_XRC_SPEC")
    return json.loads(path.read_text())
