"""The library's import graph in numbers: modules, arrows (one module importing another, at import time or inside a
function), the longest import chain, and the arrows between packages (the folders of lib/tunebook).

    python bench/import_graph.py            # the summary
    python bench/import_graph.py --arrows   # and every arrow, module by module
    python bench/import_graph.py --json     # the same as JSON

An AST walk of lib/tunebook, nothing imported and no dependency beyond Python: it runs on any checkout, before the set-up.
A module's arrows are its `import tunebook.x` and `from tunebook.x import y` statements anywhere in it (an import inside
a function only delays one); `from tunebook.pkg import mod` points at the module. Importing a module also runs its
packages' `__init__.py`, which is not drawn as an arrow. tests/test_structure.py checks the graph with these functions:
no cycle between modules, none between packages.
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"
TOP = "(top-level modules)"  # the modules directly in lib/tunebook (cli.py, errors.py, ...), one row of the package table


@dataclass
class Arrow:
    source: str
    target: str
    names: list[str] = field(default_factory=list)  # what is imported ("" for the module itself)
    lazy: bool = False  # inside a function: runs when it is called, not at import


def module_files(lib: Path = LIB) -> dict[str, Path]:
    """{dotted name: file} for every module under lib/tunebook; a package is named by its __init__.py."""
    found = {}
    for path in sorted((lib / "tunebook").rglob("*.py")):
        parts = path.relative_to(lib).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def package_of(name: str, files: dict[str, Path]) -> str:
    """The node of the package view a module belongs to: its folder under lib/tunebook (`run/` for tunebook.run.folder
    and tunebook.run itself), or, for a module directly in lib/tunebook, that module alone (`errors.py`): a top-level
    module is a unit of its own (cli.py above everything, errors.py below everything)."""
    parts = name.split(".")[1:]
    folder = parts if is_package(name, files) else parts[:-1]
    if folder:
        return "/".join(folder) + "/"
    return (parts[-1] if parts else "__init__") + ".py"


def arrows(files: dict[str, Path] | None = None) -> list[Arrow]:
    """Every import of one tunebook module by another, with what it imports and whether it is inside a function."""
    files = files or module_files()
    found: dict[tuple[str, str, bool], Arrow] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, functions) for n in ast.walk(f)}
        here = name if is_package(name, files) else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            targets: list[tuple[str, str]] = []
            if isinstance(node, ast.Import):
                targets = [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "tunebook"]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: from the package this module is in
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    module = ".".join([*base, module] if module else base)
                if module.split(".")[0] != "tunebook":
                    continue
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.append((sub, "") if sub in files else (module, alias.name))
            for target, imported in targets:
                if target == name:
                    continue
                if target not in files:
                    raise SystemExit(f"{path}: imports {target}, which is not a module of lib/tunebook")
                lazy = id(node) in in_functions
                arrow = found.setdefault((name, target, lazy), Arrow(name, target, lazy=lazy))
                arrow.names.append(imported)
    return sorted(found.values(), key=lambda a: (a.source, a.target, a.lazy))


def graph(found: list[Arrow]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for a in found:
        edges.setdefault(a.source, set()).add(a.target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle (its nodes, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(edges.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(edges):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest import chain (a -> b -> c: a imports b, which imports c) of an acyclic graph."""
    memo: dict[str, list[str]] = {}

    def chain(node: str) -> list[str]:
        if node not in memo:
            memo[node] = [node, *max((chain(t) for t in sorted(edges.get(node, ()))), key=len, default=[])]
        return memo[node]

    return max((chain(n) for n in sorted(edges)), key=len, default=[])


def package_graph(found: list[Arrow], files: dict[str, Path]) -> dict[str, set[str]]:
    """The package view: an arrow from one package (or top-level module) to another where a module of the first imports
    one of the second."""
    edges: dict[str, set[str]] = {}
    for a in found:
        source, target = package_of(a.source, files), package_of(a.target, files)
        if source != target:
            edges.setdefault(source, set()).add(target)
    return edges


def per_package(files: dict[str, Path], found: list[Arrow], lines: dict[str, int]) -> dict:
    """One row per folder, and one for the top-level modules together: modules, lines, arrows inside, arrows out."""

    def row(node: str) -> str:
        return node if node.endswith("/") else TOP

    pairs = {(a.source, a.target) for a in found}
    rows: dict[str, dict] = {}
    for name in sorted(files, key=lambda n: (row(package_of(n, files)) == TOP, package_of(n, files))):
        r = rows.setdefault(row(package_of(name, files)), {"modules": 0, "lines": 0, "arrows_inside": 0, "arrows_out": Counter()})
        r["modules"] += not is_package(name, files)
        r["lines"] += lines[name]
    for source, target in sorted(pairs):
        s, t = package_of(source, files), package_of(target, files)
        if row(s) == row(t):
            rows[row(s)]["arrows_inside"] += 1
        else:
            rows[row(s)]["arrows_out"][t] += 1
    for r in rows.values():
        r["arrows_out"] = dict(sorted(r["arrows_out"].items()))
    return rows


def summary(lib: Path = LIB) -> dict:
    files = module_files(lib)
    found = arrows(files)
    edges = graph(found)
    cycle = find_cycle(edges)
    package_cycle = find_cycle(package_graph(found, files))
    chain = [] if cycle else longest_chain(edges)
    eager = graph([a for a in found if not a.lazy])
    eager_chain = [] if find_cycle(eager) else longest_chain(eager)
    lines = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in files.items()}
    pairs = {(a.source, a.target) for a in found}
    return {
        "modules": sum(not is_package(n, files) for n in files),
        "packages": sum(is_package(n, files) for n in files),
        "lines": sum(lines.values()),
        "arrows": len(pairs),
        "arrows_at_import": len({(a.source, a.target) for a in found if not a.lazy}),
        "arrows_in_functions_only": len(pairs - {(a.source, a.target) for a in found if not a.lazy}),
        "module_cycle": cycle,
        "longest_chain": chain,
        "depth": len(chain),
        "longest_chain_at_import": eager_chain,
        "depth_at_import": len(eager_chain),
        "package_cycle": package_cycle,
        "per_package": per_package(files, found, lines),
        "arrow_list": [{"from": a.source, "to": a.target, "names": a.names, "lazy": a.lazy} for a in found],
    }


def report(s: dict, with_arrows: bool = False) -> str:
    out = [
        f"modules: {s['modules']} in {s['packages']} package(s), {s['lines']} lines",
        f"arrows: {s['arrows']} ({s['arrows_at_import']} at import time, {s['arrows_in_functions_only']} only inside functions)",
        f"module cycle: {' -> '.join(s['module_cycle']) if s['module_cycle'] else 'none'}",
        f"longest import chain: {s['depth']} modules: {' -> '.join(n.removeprefix('tunebook.') for n in s['longest_chain'])}",
        f"longest chain at import time: {s['depth_at_import']} modules: {' -> '.join(n.removeprefix('tunebook.') for n in s['longest_chain_at_import'])}",
        f"package cycle: {' -> '.join(s['package_cycle']) if s['package_cycle'] else 'none'}",
        "",
        "| package | modules | lines | arrows inside | arrows out (to package: count) |",
        "|---|---|---|---|---|",
    ]
    for p, row in s["per_package"].items():
        outs = ", ".join(f"{t} {c}" for t, c in row["arrows_out"].items()) or "-"
        out.append(f"| {p} | {row['modules']} | {row['lines']} | {row['arrows_inside']} | {outs} |")
    if with_arrows:
        out.append("")
        for a in s["arrow_list"]:
            names = ", ".join(n for n in a["names"] if n) or "(the module)"
            out.append(f"{a['from']} -> {a['to']}{' (in a function)' if a['lazy'] else ''}: {names}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrows", action="store_true", help="list every arrow too")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--lib", type=Path, default=LIB, help="the lib folder holding tunebook/ (default: this checkout's)")
    args = parser.parse_args()
    s = summary(args.lib)
    if not args.arrows:
        s.pop("arrow_list")
    print(json.dumps(s, indent=2) if args.json else report(s, args.arrows))


if __name__ == "__main__":
    main()
