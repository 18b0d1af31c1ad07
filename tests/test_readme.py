"""The README's examples run as written, and type-check as written: a new
user copies them, so they are tested like code."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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


def distribution(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_by_the_first_command():
    """The distributions the README's first command installs: zocalo-xrc with
    the extras it names (from pyproject.toml) and all they require."""
    extras = re.search(r"pip install '\.\[([\w,]+)\]'", blocks("bash")[0]).group(1).split(",")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in extras for r in project["optional-dependencies"][extra])]
    todo, found = [Requirement(r) for r in wanted], {"zocalo-xrc"}
    while todo:
        req = todo.pop()
        name = distribution(req.name)
        if name in found:
            continue
        found.add(name)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not for this platform, say
        for text in requires:
            r = Requirement(text)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(r)
    return found


#: Run first in a Python that is to have only what the first command installs:
#: a module of any other installed distribution cannot be imported.
ONLY_THE_FIRST_COMMANDS = """
import importlib.abc, importlib.metadata, json, os, re, sys

class OnlyInstalled(importlib.abc.MetaPathFinder):
    def __init__(self, allowed):
        self.owners = importlib.metadata.packages_distributions()
        self.allowed = allowed

    def find_spec(self, name, path=None, target=None):
        owners = {re.sub(r"[-_.]+", "-", d).lower() for d in self.owners.get(name.partition(".")[0], ())}
        if owners and not owners & self.allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed by the README's first command)",
                                      name=name)
        return None

sys.meta_path.insert(0, OnlyInstalled(set(json.loads(os.environ["INSTALLED"]))))
"""


def run_as_installed(path, *args, installed, timeout=120):
    """``path`` run as ``python path args``, with only ``installed`` importable."""
    code = ONLY_THE_FIRST_COMMANDS + f"sys.argv = {[str(path), *args]!r}\nimport runpy\n" \
        f"runpy.run_path({str(path)!r}, run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**clean_env(), "INSTALLED": json.dumps(sorted(installed))})


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Every Python block of the README, in order, as one script."""
    path = tmp_path_factory.mktemp("readme") / "readme_examples.py"
    path.write_text("\n".join(blocks("python")))
    return path


def test_the_python_examples_run_as_written(examples):
    """After the first command: nothing else installed is imported."""
    assert len(blocks("python")) >= 3
    out = run_as_installed(examples, installed=installed_by_the_first_command())
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr


def test_the_example_plan_needs_only_the_first_command():
    out = run_as_installed(ROOT / "examples" / "gridscan_plan.py", installed=installed_by_the_first_command())
    assert out.returncode == 0, out.stderr
    assert "moved to x" in out.stdout


@pytest.mark.parametrize("part, extra, missing", [("zocalo_xrc.bluesky", "bluesky", "ophyd-async"),
                                                  ("zocalo_xrc.bluesky", "bluesky", "bluesky"),
                                                  ("zocalo_xrc.local", "local", "workflows")])
def test_a_missing_extra_is_named(part, extra, missing):
    installed = installed_by_the_first_command() - {missing}
    code = ONLY_THE_FIRST_COMMANDS + f"import {part}\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**clean_env(), "INSTALLED": json.dumps(sorted(installed))})
    assert out.returncode == 1
    module = missing.replace("-", "_")
    assert out.stderr.strip().splitlines()[-1] == (f"ImportError: {part} needs {module}, which is not installed: "
                                                   f"pip install 'zocalo-xrc[{extra}]'")


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
    assert out.stdout.count("put on the frames by the model") == 2, out.stdout  # from pixels, as the README says
    assert list(tmp_path.iterdir()) == [tmp_path / "demo.png"]  # the frames went with the temporary state
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert tests in (ROOT / ".ci" / "run").read_text()
