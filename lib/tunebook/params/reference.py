"""The params reference: every key with its default, the stage that first reads it and its meaning, as rows and as
the markdown table that `python -m tunebook params` prints and docs/params.md holds (between its params-table markers).
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml
from pydantic import BaseModel

from tunebook.params.schema import Params, section_type, stage_map


def schema_rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every knob, in schema order: what `tunebook params` and docs/params.md show."""
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = prefix + name
            section = section_type(field.annotation)
            if section is not None and section is field.annotation:
                walk(section, key + ".")
                continue
            if section is not None:  # a list of sections: the list, then each item's keys
                rows.append((key, "[]", field.description or ""))
                walk(section, key + "[].")
                continue
            default = "(required)" if field.is_required() else inline_yaml(field.get_default(call_default_factory=True))
            rows.append((key, default, field.description or ""))

    walk(Params, "")
    return rows


def inline_yaml(value: Any) -> str:
    """A default as YAML on one line (a table cell): never wrapped, and a text with line breaks double-quoted with
    escapes (JSON, which YAML reads as the same value)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix("...").strip()
    return json.dumps(value, ensure_ascii=False) if "\n" in text else text


def schema_markdown() -> str:
    """The params table: each key, its default, the stage that first reads it (a change re-runs that stage and the
    ones after; — = where the run lives, no stage) and its meaning."""
    stages = stage_map()

    def stage(key: str) -> str:
        key = key.split("[]")[0].rstrip(".")
        while key not in stages:
            key = key.rsplit(".", 1)[0]
        return stages[key][:2] if stages[key] else "—"

    lines = ["| key | default | stage | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {stage(k)} | {m} |" for k, d, m in schema_rows()]
    return "\n".join(lines)
