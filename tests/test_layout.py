"""The layer order of medad's subpackages stated in the README's Layout section holds for every import (issue #9):
a subpackage imports only those listed above it, so there are no cycles; lazy imports inside functions count."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "medad"


def _layers() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^medad/(\w+)\s", section, flags=re.MULTILINE)


def _imported_subpackages(path: Path, subpackages: set[str]) -> set[str]:
    """Subpackages of medad that ``path`` imports (absolute or relative imports, at any depth of the module)."""
    package = ["medad", *path.relative_to(PACKAGE).parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names = [f"{module}.{alias.name}" for alias in node.names] if module in ("medad", "") or not node.module else [module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if len(parts) > 1 and parts[0] == "medad" and parts[1] in subpackages:
                found.add(parts[1])
    return found


def test_the_readme_lists_every_subpackage_once():
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    layers = _layers()
    assert sorted(layers) == subpackages and len(set(layers)) == len(layers)


def test_no_subpackage_imports_one_listed_below_it():
    layers = _layers()
    rank = {name: i for i, name in enumerate(layers)}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).parts
        if len(relative) == 1:
            continue  # medad/cli.py, bundle.py, ...: the application layer above every subpackage
        own = relative[0]
        for other in _imported_subpackages(path, set(rank)) - {own}:
            if rank[other] > rank[own]:
                wrong.append(f"{path.relative_to(REPO)} imports medad.{other} (listed below medad.{own})")
    assert not wrong, "\n".join(wrong)
