"""The library's shape, from bench/import_graph.py's AST walk of lib/tunebook and its folders: no import cycle between
modules (counting imports inside functions, which only hide one) nor between packages (a folder, or a module directly
in lib/tunebook), no module importing another's private name, each package's __init__.py only its docstring, and the
README's code map naming every module where it is."""

import ast
import importlib.util
import re
import sys

from conftest import ROOT

LIB = ROOT / "lib" / "tunebook"
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "bench" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
sys.modules["import_graph"] = import_graph  # its dataclasses look their module up there
spec.loader.exec_module(import_graph)
FILES = import_graph.module_files()
ARROWS = import_graph.arrows(FILES)


def test_the_walk_sees_every_module():
    assert {p for p in FILES.values()} == set(LIB.rglob("*.py"))
    assert {"tunebook.run.folder", "tunebook.params.schema", "tunebook.dataset.build", "tunebook.cli"} <= set(FILES)


def test_no_import_cycle_between_modules():
    cycle = import_graph.find_cycle(import_graph.graph(ARROWS))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    edges = import_graph.graph(ARROWS)
    # the leaves stay leaves
    assert not edges.get("tunebook.errors") and not edges.get("tunebook.metrics") and not edges.get("tunebook.params.drive")
    assert edges["tunebook.run.rows"] <= {"tunebook.errors"}


def test_no_import_cycle_between_packages():
    """A stage's package imports the shared packages and the stages before it, never the other way round."""
    packages = import_graph.package_graph(ARROWS, FILES)
    cycle = import_graph.find_cycle(packages)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle)
    assert not packages["params/"] - {"errors.py", "metrics.py"}  # the schema stands on nothing but errors and metrics
    assert "colab/" not in packages["run/"]  # a stage's Colab installs are called by the stage, not by the run folder


def test_no_private_name_is_imported_across_modules():
    private = [f"{a.source}: {a.target}.{name}" for a in ARROWS for name in a.names if name.startswith("_")]
    assert not private, private


def test_a_package_init_holds_only_its_docstring():
    """Importing a package runs nothing and imports nothing: a module is imported by its own path."""
    for init in LIB.rglob("__init__.py"):
        if init.parent == LIB:
            continue
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), f"{init}: only a docstring"


def code_map_modules(section: str) -> list[str]:
    """The module paths (relative to lib/tunebook) that the code map's tree names: a line's depth is the width of its
    tree prefix ("├── " at the top, "│   ├── " one folder down)."""
    named, folders, inside = [], [], False
    for line in section.splitlines():
        if line.startswith("lib/tunebook/"):
            inside = True
            continue
        match = re.match(r"^([│├└─ ]+)(\w+)(\.py|/)(\s|$)", line) if inside else None
        if match is None:
            inside = inside and (not line.strip() or line[:1] in ("│", "├", "└", " "))  # the tree ends at bench/
            continue
        depth = len(match[1]) // 4 - 1
        folders = folders[:depth]
        if match[3] == "/":
            folders.append(match[2])
        else:
            named.append("/".join([*folders, match[2] + ".py"]))
    return named


def test_the_readme_module_map_names_every_module():
    """README's "Code map" section: a file tree of lib/tunebook with one line per module, in its folder, and none that
    is gone."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Code map\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert section, "README.md has no '## Code map' section"
    named = code_map_modules(section.group(1))
    modules = sorted(str(p.relative_to(LIB)) for p in LIB.rglob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if m not in named]
    assert not missing, f"README's code map does not name {missing}"
    gone = [m for m in named if m not in modules]
    assert not gone, f"README's code map names modules that lib/tunebook does not have: {gone}"
    assert len(named) == len(set(named)), "README's code map names a module twice"


def test_each_quantize_method_is_named_once_and_made_by_quantize():
    from tunebook.params.schema import QUANTIZE_METHODS, QuantizeParams
    from tunebook.quantizing.quantize import QUANTIZERS

    assert set(QUANTIZERS) == set(QUANTIZE_METHODS)
    assert QuantizeParams(methods=list(QUANTIZE_METHODS)).methods == list(QUANTIZE_METHODS)  # the schema takes exactly these


def test_each_chat_format_is_named_once_and_read_by_chat_files():
    from tunebook.dataset.chat_files import FORMAT_KEYS
    from tunebook.params.schema import CHAT_FORMATS, DataParams

    assert set(FORMAT_KEYS) == set(CHAT_FORMATS)
    assert [DataParams(format=f).format for f in CHAT_FORMATS] == list(CHAT_FORMATS)
