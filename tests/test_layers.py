"""The package's modules in layers: none imports one above it, at the top of
a file or inside a function (where a circle hides until it is called)."""

import ast
from pathlib import Path

import zocalo_xrc

PACKAGE = Path(zocalo_xrc.__file__).parent

#: Lowest first. A module belongs to the first layer holding a prefix of its
#: name; the package itself, the public face, sits with the client.
LAYERS = [
    ("zocalo_xrc.messaging", "zocalo_xrc._extras"),
    ("zocalo_xrc._native", "zocalo_xrc._results", "zocalo_xrc._text", "zocalo_xrc._counts", "zocalo_xrc._progress",
     "zocalo_xrc.grid", "zocalo_xrc.centring", "zocalo_xrc.geometry", "zocalo_xrc.messages",
     "zocalo_xrc.summary", "zocalo_xrc.pia"),
    ("zocalo_xrc.client", "zocalo_xrc.service", "zocalo_xrc.local"),
    ("zocalo_xrc.bluesky", "zocalo_xrc.demo"),
    ("zocalo_xrc.cli", "zocalo_xrc.__main__"),
]
MODULES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in PACKAGE.rglob("*.py")}
NAMES = MODULES.keys() | {"zocalo_xrc._native"}  # and the compiled core, which imports nothing of the package


def layer(module: str) -> int:
    module = "zocalo_xrc.client" if module == "zocalo_xrc" else module
    for k, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return k
    raise AssertionError(f"{module} is in no layer: give it one in LAYERS")


def imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports, wherever in it."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{target}.{a.name}" for a in node.names} & NAMES
            found |= submodules or {target}
    return found & NAMES


def test_no_module_imports_one_above_it():
    upward = sorted(f"{m} imports {i}" for m in MODULES for i in imports(m) if layer(i) > layer(m))
    assert upward == []


def test_the_service_messaging_bluesky_and_local_never_import_the_cli_or_the_demo():
    for module in MODULES:
        if module.partition(".")[2].partition(".")[0] in ("service", "messaging", "bluesky", "local"):
            assert not {i for i in imports(module) if i in ("zocalo_xrc.cli", "zocalo_xrc.demo")}, module
