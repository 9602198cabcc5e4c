"""The import graph of ``edgemesh/`` runs one way: a module never imports a higher layer.

Every module is parsed with ``ast`` (nothing is imported); both module-level and function-level
imports count, relative ones too. The table is the one in docs/architecture.md: change both
together. A new top-level package must be placed in it, or this test fails and says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2] / "edgemesh"

# Lowest first. Packages on one line share a layer (they may import each other).
LAYERS: list[tuple[str, ...]] = [
    ("edgemesh", "errors", "types", "clock", "cbuild"),  # cbuild: our C sources built on first use
    ("config",),
    ("wire",),
    ("identity",),
    ("transport",),
    ("rpc",),  # dispatch semantics shared by zmq links and ICE channels
    ("mesh",),  # defines the PeerPath face that nat provides
    ("nat",),
    ("collective",),
    ("weights", "kernels"),  # kernels: native compute kernels built on first use
    ("llm", "vit", "swarm"),
    ("placement",),
    ("runtime",),
    ("testbed",),
    ("bench",),  # measures runtime and testbed; nothing in the library imports a benchmark
    ("cli",),
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _component(module: str) -> str:
    """``edgemesh.mesh.peers`` -> ``mesh``; ``edgemesh.errors`` -> ``errors``; ``edgemesh`` -> ``edgemesh``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    return _imports_in(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_in(source: str, me: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every ``edgemesh`` import in ``source``, at any depth."""
    tree = ast.parse(source)
    package = me if is_package else me.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "edgemesh":  # `from edgemesh import x`: x is the component
                found += [(node.lineno, f"edgemesh.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, m) for line, m in found if m == "edgemesh" or m.startswith("edgemesh.")]


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_package_has_a_layer() -> None:
    unknown = sorted({_component(_module_name(p)) for p in _modules()} - set(LEVEL))
    assert not unknown, f"place {unknown} in LAYERS here and in docs/architecture.md"


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in _modules():
        me = _component(_module_name(path))
        for line, target in _imports(path):
            them = _component(target)
            if them in LEVEL and me in LEVEL and LEVEL[them] > LEVEL[me]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: {me} imports {target} ({them} is higher)")
    assert not wrong, "lower layers import higher ones:\n" + "\n".join(wrong)


def test_the_checker_sees_function_level_and_relative_imports() -> None:
    found = {m for _, m in _imports(ROOT / "mesh" / "peers.py")}
    assert "edgemesh.rpc.dispatch" in found and "edgemesh.mesh.paths" in found
    source = "def f():\n    from ..runtime import daemon\n    import edgemesh.cli\n    from edgemesh import bench\n"
    assert {m for _, m in _imports_in(source, "edgemesh.wire.codec", False)} == {
        "edgemesh.runtime", "edgemesh.cli", "edgemesh.bench"}
