"""Changing a raw params dict: `key=value` overrides (`--set`, a sweep's grid), dotted keys, and the keys whose
relative values are paths, resolved against the params file's folder (an override's against the current folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunebook.params.schema import ParamsError

# Keys whose relative values are paths: resolved against the params file's folder (values given with
# --set against the current folder), so a run behaves the same from the repo root, notebooks/ or Colab.
PATH_KEYS = (
    "output_dir",
    "data.train_path",
    "synthesize.documents_path",
    "synthesize.teacher.cache_dir",
    "data.eval_path",
    "data.relabels_path",
    "data.retrieval.corpus_path",
    "rounds.questions_path",
    "model.name",
    "train.accelerate_config",
)
ALWAYS_PATHS = ("output_dir", "synthesize.documents_path", "synthesize.teacher.cache_dir", "train.accelerate_config")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def apply_setting(raw: dict, key: str, value: Any, base: Path, source: str) -> None:
    """Set one dotted key of a raw params dict; a relative path value is resolved against `base`."""
    single: dict = {}
    _set_dotted(single, key, value, source=source)
    resolve_paths(single, base)
    _set_dotted(raw, key, _get_dotted(single, key), source=source)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=10")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, (dict, list)) and not text.lstrip().startswith(("{", "[")):
        value = text  # "Answer:" or "Passages: {passages}" is text; a mapping or list on a command line is written {…} / […]
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"{source} {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def _get_dotted(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


def resolve_paths(raw: dict, base: Path) -> None:
    for key in PATH_KEYS:
        try:
            value = _get_dotted(raw, key)
        except (KeyError, TypeError):
            continue
        if not isinstance(value, str) or not value or Path(value).is_absolute() or value.startswith("embedded:"):
            continue
        candidate = base / value
        # Data and model values may be hub ids, so only existing paths are rewritten; the others are always paths.
        if key in ALWAYS_PATHS or candidate.exists() or value.startswith(".") or Path(value).suffix in DATA_SUFFIXES:
            _set_dotted(raw, key, str(candidate.resolve()), source="params")
