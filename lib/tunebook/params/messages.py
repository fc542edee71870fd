"""Params that do not validate, explained: one line per wrong key, naming the key, what it must be and the value it
got (never an API key's), with the closest known key for a misspelt one.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from tunebook.params.schema import Params, section_type


def explain(error: ValidationError, source: str, raw: Any = None) -> str:
    problems: list[str] = []
    for item in error.errors():
        line = _problem(item, raw)
        if line not in problems:  # a union's branches fail one by one: one line for the key
            problems.append(line)
    lines = [f"{source}: {len(problems)} problem(s) in the params:", *problems]
    lines.append("Run `python -m tunebook params` to list every key with its meaning.")
    return "\n".join(lines)


def _problem(item: dict, raw: Any) -> str:
    loc = ".".join(str(p) for p in item["loc"])
    msg = item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        section = _section_for(item["loc"][:-1])
        known = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(item["loc"][-1]), known, n=1, cutoff=0.5)
        hint = f" Did you mean '{'.'.join([*map(str, item['loc'][:-1]), close[0]])}'?" if close else ""
        return f"  - unknown key '{loc}'.{hint} Known keys here: {', '.join(known)}."
    if item["type"] == "missing":
        return f"  - '{loc}' is required."
    if item["type"] == "value_error" and isinstance(item.get("input"), dict):  # a rule across keys of a section: its message names them
        return f"  - {msg if not loc or msg.startswith(loc + '.') else loc + ': ' + msg}."
    # The key is the schema field the error is on (a union's branch name or a list index after it is pydantic's).
    found = _field_at(item["loc"])
    key_loc = item["loc"][: found[0] + 1] if found else item["loc"]
    key = ".".join(str(p) for p in key_loc)
    secret = key_loc[-1] == "api_key_env"  # a value put where a key's *name* belongs may be the key itself: never echo it
    rule = ((found[1].json_schema_extra or {}) if found else {}).get("allowed")
    if rule or msg.startswith("must "):
        value = _raw_at(raw, key_loc, item.get("input")) if rule else item.get("input")
        shown = "" if secret else f"; got {_shown(value)}"
        return f"  - {key} {'must be ' + rule if rule else msg}{shown}."
    shown = "" if secret else f" (got {_shown(item.get('input'))})"
    return f"  - '{loc}': {msg}{shown}."


def _shown(value: Any) -> str:
    """A value as the user wrote it: YAML's true/false/null, Python's repr otherwise (quotes mark a string)."""
    return {True: "true", False: "false", None: "null"}[value] if value is None or isinstance(value, bool) else repr(value)


def _field_at(loc: tuple) -> tuple[int, Any] | None:
    """(position in loc, FieldInfo) of the deepest schema field along an error's location."""
    model: type[BaseModel] | None = Params
    found = None
    for i, part in enumerate(loc):
        if isinstance(part, int):  # an item of a list
            continue
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            break
        found = (i, field)
        model = section_type(field.annotation)
    return found


def _raw_at(raw: Any, loc: tuple, default: Any) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return default
    return node


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections (evaluate.api_baselines.0)
            continue
        field = model.model_fields.get(str(part))
        model = section_type(field.annotation) if field else None
        if model is None:
            return None
    return model
