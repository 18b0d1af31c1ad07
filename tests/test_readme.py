"""The README's examples run as written, and type-check as written: a new
user copies them, so they are tested like code."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands(block):
    """The command lines of a bash block, comments dropped."""
    return [line for line in (raw.split("  #")[0].strip() for raw in block.splitlines()) if line and not line.startswith("#")]


def clean_env():
    """A user's environment with no broker configured."""
    env = {k: v for k, v in os.environ.items() if k not in ("ZOCALO_CONFIG", "DODAL_TEST_MODE")}
    return env


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Every Python block of the README, in order, as one script."""
    path = tmp_path_factory.mktemp("readme") / "readme_examples.py"
    path.write_text("\n".join(blocks("python")))
    return path


def test_the_python_examples_run_as_written(examples):
    assert len(blocks("python")) >= 3
    out = subprocess.run([sys.executable, str(examples)], cwd=ROOT, capture_output=True, text=True, env=clean_env(),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr


def test_mypy_strict_accepts_the_python_examples(examples):
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(examples)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


def test_pyright_accepts_the_python_examples(examples):
    """pyright in its strict mode (through basedpyright, which ships pyright
    with its own Node.js, so nothing is fetched at run time)."""
    basedpyright = shutil.which("basedpyright")
    assert basedpyright, "basedpyright is in the test extra"
    (examples.parent / "pyrightconfig.json").write_text(json.dumps({"typeCheckingMode": "strict", "pythonVersion": "3.11"}))
    out = subprocess.run([basedpyright, "--pythonpath", sys.executable, examples.name], cwd=examples.parent,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "0 errors, 0 warnings" in out.stdout, out.stdout + out.stderr


def test_the_command_line_examples_run_as_written(tmp_path):
    """In a user's own directory beside the examples: every line succeeds."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    lines = commands(next(b for b in blocks("bash") if "zocalo-xrc centre" in b))
    assert len(lines) >= 5
    for line in lines:
        out = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, env=clean_env(), timeout=120)
        assert out.returncode == 0, (line, out.stderr)
        assert out.stdout.strip(), line
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


def test_the_spot_finding_commands_run_as_written(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    lines = commands(next(b for b in blocks("bash") if "find-spots" in b and "zocalo-xrc centre" not in b))
    assert len(lines) == 2
    for line in lines:
        out = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, env=clean_env(), timeout=120)
        assert out.returncode == 0, (line, out.stderr)
        assert out.stdout.strip(), line
    assert (tmp_path / "image.png").read_bytes()[:4] == b"\x89PNG"


def test_the_first_commands_demo_and_ci_runs_the_test_command(tmp_path):
    install_and_demo, tests = commands(blocks("bash")[0])
    demo = install_and_demo.split(" && ", 1)[1]
    assert demo.split()[:2] == ["zocalo-xrc", "demo"]
    out = subprocess.run(demo, shell=True, cwd=tmp_path, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert out.returncode == 0 and "GPU results (" in out.stdout and "CPU results (" in out.stdout, out.stderr
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert tests in (ROOT / ".ci" / "run").read_text()
