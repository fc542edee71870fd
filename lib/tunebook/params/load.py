"""Reading params: a params YAML read strictly (a key given twice, a file that is missing, not UTF-8 or not YAML is
named), its relative paths resolved and `--set` overrides applied (params/overrides.py), validated against the schema,
each wrong key explained (params/messages.py); and the resolved params written back as YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunebook.params.messages import explain
from tunebook.params.overrides import apply_setting, parse_override, resolve_paths
from tunebook.params.schema import Params, ParamsError


def load_params(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read a params YAML, apply `key=value` overrides, validate, and return the params."""
    return validate_params(read_params(path, overrides), source=str(path))


def read_params(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A params YAML as a plain dict, its relative paths resolved and `key=value` overrides applied (not validated)."""
    path = Path(path)
    raw = read_yaml(path, "params file") or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of keys (run_name:, data:, ...), not {type(raw).__name__}.")
    resolve_paths(raw, path.resolve().parent)
    for item in overrides:
        apply_setting(raw, *parse_override(item), base=Path.cwd(), source="--set")
    return raw


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (plain PyYAML keeps the last one silently)."""

    def construct_document(self, node):
        self._refuse_repeated_keys(node, [], set())
        return super().construct_document(node)

    def _refuse_repeated_keys(self, node, path: list[str], seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already checked
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden, as YAML says
                    continue
                key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
                try:
                    first = lines.get(key) if key is not None else None
                except TypeError:  # an unhashable key: PyYAML refuses it itself
                    first = None
                if first is not None:
                    raise RepeatedKey(".".join([*path, str(key)]), first, key_node.start_mark.line + 1)
                if key is not None:
                    lines[key] = key_node.start_mark.line + 1
                self._refuse_repeated_keys(value_node, [*path, str(key)], seen)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._refuse_repeated_keys(item, [*path, str(index)], seen)


class RepeatedKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """A YAML file's contents, read strictly: a key given twice in one mapping, a file that is missing, a folder, not
    UTF-8 or not YAML is a ParamsError naming the file (and the key and both lines)."""
    path = Path(path)
    if path.is_dir():
        raise ParamsError(f"{path} is a folder, not a {what}.")
    if not path.exists():
        raise ParamsError(f"{what[0].upper() + what[1:]} not found: {path}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError:
        raise ParamsError(f"{path} is not UTF-8 text.") from None
    except RepeatedKey as e:
        where = f"on line {e.first}" if e.first == e.second else f"on lines {e.first} and {e.second}"
        raise ParamsError(f"{path}: key '{e.key}' is given twice, {where}; keep one (YAML would silently use the last).") from None
    except yaml.MarkedYAMLError as e:  # where and what, without PyYAML's echo of the parser's state
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{path} is not valid YAML{where}: {e.problem or e.context}.") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None


def validate_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(explain(e, source, raw)) from None


def dump_params(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
