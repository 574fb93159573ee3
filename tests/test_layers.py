"""The layout is the architecture: each layer imports only the layers below it.

functions (the handlers) import nothing of the runner; the runtime (what a
function process runs) imports the shared names and the topology, never an
operation or a tool; operations (servers, accounts, provisioning) never a
tool; nothing in the package imports the command line or the benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What each layer may import, of this project's packages.
SHARED = {"functions", "orderflow.config", "orderflow.limits", "orderflow.subjects"}
ALLOWED = {
    "functions": {"functions"},
    "orderflow.runtime": SHARED | {"orderflow.runtime"},
    "orderflow.ops": SHARED | {"orderflow.runtime", "orderflow.ops"},
    "orderflow.tools": SHARED | {"orderflow.runtime", "orderflow.ops", "orderflow.tools"},
}
OURS = ("functions", "orderflow", "bench")


def imported(path: Path) -> set[str]:
    """The project modules ``path`` imports (``from orderflow import x`` counts as orderflow.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in OURS}


def layer_of(module: str) -> str | None:
    return next((layer for layer in sorted(ALLOWED, key=len, reverse=True)
                 if module == layer or module.startswith(layer + ".")), None)  # fmt: skip


def modules(layer: str) -> list[Path]:
    return sorted((ROOT / layer.replace(".", "/")).rglob("*.py"))


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_each_layer_imports_only_what_is_below_it(layer: str) -> None:
    assert modules(layer), f"{layer} has no modules"
    wrong = []
    for path in modules(layer):
        for name in imported(path):
            # `from orderflow import config` also names the bare package: its __init__.
            below = any(name == a or name.startswith(a + ".") for a in ALLOWED[layer])
            if not below and name != "orderflow":
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_layers_cover_every_module_of_the_package() -> None:
    top = {p.stem for p in (ROOT / "orderflow").glob("*.py")} - {"__init__"}
    assert top - {"cli"} == {"config", "limits", "subjects"}, top  # cli.py or the package
    packages = {p.name for p in (ROOT / "orderflow").iterdir() if (p / "__init__.py").exists()}
    assert packages == {"runtime", "ops", "tools", "cli"} - ({"cli"} if "cli" in top else set())


def test_a_layer_check_would_see_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from orderflow.tools import trace\nimport bench.run\n")
    assert imported(bad) == {"orderflow.tools", "orderflow.tools.trace", "bench.run"}
