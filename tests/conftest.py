import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
SPEC = Path(os.environ.get("ZOCALO_XRC_SPEC", ROOT.parent / "shared" / "spec"))

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def vectors():
    path = SPEC / "xrc-vectors.json"
    if not path.exists():
        pytest.fail(f"spec vectors not found at {path}; set ZOCALO_XRC_SPEC")
    return json.loads(path.read_text())
