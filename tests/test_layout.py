"""The architecture as a checked contract: dependencies point one way, no import circle, no
function-local import hiding one, and no code outside fabfile/providers/ names a provider.

tasks (fabfile/*.py) -> flows -> balancing / scaling / providers -> services -> hosts -> core.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fabfile import providers

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fabfile"

RANK = {"core": 0, "hosts": 1, "services": 2, "balancing": 3, "scaling": 3, "providers": 3, "flows": 4}
TASKS = 5


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if module == "fabfile":
        return "fabfile", TASKS + 1
    if len(parts) == 2 and parts[1] not in RANK:
        return "tasks", TASKS
    return parts[1], RANK[parts[1]]


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def resolve(importer: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = importer if is_pkg else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        mod = f"{base}.{node.module}" if node.module else base
    else:
        mod = node.module or ""
    found = []
    for alias in node.names:
        full = f"{mod}.{alias.name}"
        found.append(full if full in MODULES else mod)
    return [m for m in found if m in MODULES]


def imports_of(module: str) -> list[tuple[str, bool, int]]:
    """(imported fabfile module, at module level, line) for every import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking |= {id(n) for b in node.body for n in ast.walk(b)}
    top = {id(n) for n in tree.body} | type_checking
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            targets = resolve(module, path.name == "__init__.py", node)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name in MODULES]
        for t in targets:
            if id(node) not in type_checking:
                found.append((t, id(node) in top, node.lineno))
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_package_is_in_a_layer():
    for module in MODULES:
        layer(module)  # raises KeyError for a package nobody placed


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dependencies_point_down(module):
    pkg, rank = layer(module)
    for target, _, line in GRAPH[module]:
        if target == module or target in ("fabfile",):
            continue
        tpkg, trank = layer(target)
        if tpkg == pkg:
            continue
        assert trank < rank, (f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}: "
                              f"{pkg} (layer {rank}) may only import layers below it, not {tpkg} (layer {trank})")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_local_import_of_booted_modules(module):
    local = [(t, line) for t, at_top, line in GRAPH[module] if not at_top]
    assert not local, f"{MODULES[module].relative_to(ROOT)}: function-local imports {local} (import at the top)"


def test_no_import_circle():
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t, _, _ in GRAPH[m]:
            if t == m or (m.startswith(t + ".") and MODULES[t].name == "__init__.py"):
                continue  # a package's own __init__ is imported by every module in it
            if seen.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in MODULES:
        if m not in seen:
            visit(m)


def test_only_providers_name_providers():
    names = set(providers.NAMES)
    for module, path in MODULES.items():
        if module.startswith("fabfile.providers"):
            continue
        tree = ast.parse(path.read_text())
        json_keys = {id(n.args[0]) for n in ast.walk(tree)  # d.get("local"): a key of some JSON, not a provider
                     if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" and n.args}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in json_keys:
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} names provider {node.value!r}: "
                            "ask the provider interface instead")


def test_each_provider_is_one_folder_with_settings_and_provider():
    for name in providers.NAMES:
        folder = PKG / "providers" / name
        assert (folder / "settings.py").is_file() and (folder / "provider.py").is_file(), folder


def test_each_provider_folder_stands_alone():
    """A provider uses another only through the registry (``get_provider``), never its modules:
    what two providers share lives below them in fabfile/providers/ (rootfs, bridge, kickstart)."""
    for module in MODULES:
        parts = module.split(".")
        if len(parts) < 4 or parts[1] != "providers" or parts[2] not in providers.NAMES:
            continue
        for target, _, line in GRAPH[module]:
            t = target.split(".")
            if len(t) >= 3 and t[1] == "providers" and t[2] in providers.NAMES and t[2] != parts[2]:
                pytest.fail(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}, another provider's module")
