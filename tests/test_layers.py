"""The layers, enforced: which top-level package may import which (docs/architecture.md).

    agent ──> batch ──> kernel ──> protos        hub ──> kernel ──> protos

Hub and agent never import each other, batch imports neither, the kernel imports none of the
three, and protos/ holds only the .proto files' generated code. Every import counts, also those
inside functions (a hidden dependency is still a dependency). The packages are installed as
``modelfleet.agent``, ``modelfleet.hub``, ...: a bare ``import agent`` works only from a checkout,
so it is refused too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "hub", "batch", "kernel", "protos")
# What each package must not import (besides itself, anything not listed is allowed).
FORBIDDEN = {
    "kernel": {"agent", "hub", "batch"},
    "protos": {"agent", "hub", "batch", "kernel"},
    "batch": {"agent", "hub"},
    "hub": {"agent", "batch"},
    "agent": {"hub"},
}


def _package(module: str) -> str:
    """Our package a module name is in ("modelfleet.hub.core" -> "hub"), or its top level."""
    parts = module.split(".")
    if parts[0] == "modelfleet" and len(parts) > 1:
        return parts[1]
    return parts[0]


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``source``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(root: Path) -> list[str]:
    out = []
    for package, banned in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            for line, module in imported_modules(path.read_text()):
                target = _package(module)
                if module.split(".")[0] in PACKAGES:
                    out.append(f"{rel}:{line}: import modelfleet.{module}, not {module}")
                if target in banned:
                    out.append(f"{rel}:{line}: {package} must not import {target}")
    for path in sorted((root / "protos").glob("*.py")):
        if path.name != "__init__.py" and not path.stem.endswith(("_pb2", "_pb2_grpc")):
            out.append(f"{path.relative_to(root)}: protos/ holds generated code only")
    return out


def test_the_tree_keeps_its_layers() -> None:
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    ("package", "code", "expected"),
    [
        (
            "hub",
            "def f():\n    from modelfleet.agent.slots import SlotManager\n",
            "hub must not import agent",
        ),
        ("kernel", "import modelfleet.hub.core\n", "kernel must not import hub"),
        ("batch", "from modelfleet.agent import runtime\n", "batch must not import agent"),
        ("agent", "if True:\n    import modelfleet.hub\n", "agent must not import hub"),
        ("agent", "from kernel import atomic\n", "import modelfleet.kernel, not kernel"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path: Path, package: str, code: str, expected: str):
    for p in PACKAGES:
        (tmp_path / p).mkdir()
    (tmp_path / package / "bad.py").write_text(code)
    assert any(expected in v for v in violations(tmp_path))


def test_a_hand_written_module_in_protos_is_caught(tmp_path: Path) -> None:
    for p in PACKAGES:
        (tmp_path / p).mkdir()
    (tmp_path / "protos" / "helpers.py").write_text("X = 1\n")
    (tmp_path / "protos" / "fleet_pb2.py").write_text("X = 1\n")
    assert violations(tmp_path) == ["protos/helpers.py: protos/ holds generated code only"]
