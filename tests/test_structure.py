"""The library's shape: no import cycle (counting imports inside functions, which only hide one), no module importing
another's private name, and the README's code map naming every module. An AST walk of lib/tunebook: twenty lines,
and no import-graph dependency for them."""

import ast
import re

from conftest import ROOT

LIB = ROOT / "lib" / "tunebook"
MODULES = sorted(p.stem for p in LIB.glob("*.py") if p.stem not in ("__init__", "__main__"))


def imports(module: str) -> list[tuple[str, str]]:
    """(module, name) for every `from tunebook[.module] import name` anywhere in a module, functions included."""
    found = []
    for node in ast.walk(ast.parse((LIB / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tunebook":
            for alias in node.names:
                found.append((node.module.split(".")[1], alias.name) if "." in node.module else (alias.name, ""))
    return found


def test_no_import_cycle():
    graph = {m: {target for target, _ in imports(m) if target in MODULES and target != m} for m in MODULES}
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)
    assert graph["rows"] <= {"errors"} and not graph["errors"]  # the leaves stay leaves


def test_no_private_name_is_imported_across_modules():
    private = [f"{m}: {target}.{name}" for m in MODULES for target, name in imports(m) if name.startswith("_")]
    assert not private, private


def test_the_readme_module_map_names_every_module():
    """README's "Code map" section: a file tree with one line per module of lib/tunebook, and none that is gone."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Code map\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert section, "README.md has no '## Code map' section"
    named = re.findall(r"^\S*[│├└─ ]+(\w+)\.py ", section.group(1), re.M)
    missing = [m for m in MODULES if m not in named]
    assert not missing, f"README's code map does not name {missing}"
    gone = [m for m in named if m not in MODULES and m != "__main__"]
    assert not gone, f"README's code map names modules that lib/tunebook does not have: {gone}"
    assert len(named) == len(set(named)), "README's code map names a module twice"


def test_each_quantize_method_is_named_once_and_made_by_quantize():
    from tunebook.params.schema import QUANTIZE_METHODS, QuantizeParams
    from tunebook.quantizing.quantize import QUANTIZERS

    assert set(QUANTIZERS) == set(QUANTIZE_METHODS)
    assert QuantizeParams(methods=list(QUANTIZE_METHODS)).methods == list(QUANTIZE_METHODS)  # the schema takes exactly these
