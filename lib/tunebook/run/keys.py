"""Stage keys: a hash of every params value read by a stage or an earlier one, from the stage each key is first read
by (the schema's read_first_by marks). Two runs with the same key at a stage have the same outputs there: a re-run
compares them, and a sweep runs such a stage once and copies it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

from tunebook.params.schema import STAGES, Params, stage_map

# The stage that first reads each params section or key, as the schema declares it (params/schema.py's read_first_by).
FIRST_READ_BY = stage_map()
WHERE_KEYS = tuple(key for key, stage in FIRST_READ_BY.items() if stage is None)  # where a run lives, how it was launched


def params_values(params: Params, keep: Callable[[str], bool]) -> dict:
    """The flattened params values whose dotted keys `keep` accepts (where-keys never count): what params_key hashes."""
    flat = flatten(params.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if not is_under(k, WHERE_KEYS) and keep(k)}


def params_key(params: Params, keep: Callable[[str], bool]) -> str:
    """A short hash of the params values whose dotted keys `keep` accepts."""
    return hashlib.sha256(json.dumps(params_values(params, keep), sort_keys=True).encode()).hexdigest()[:16]


def stage_key(params: Params, stage: str) -> str:
    """The key of a stage's outputs: every params value read by this stage or an earlier one."""
    return params_key(params, lambda key: _read_by(key, stage))


def stage_values(params: Params, stage: str) -> dict:
    """The flattened params values stage_key hashes, to name the keys that differ between two keys."""
    return params_values(params, lambda key: _read_by(key, stage))


def _read_by(key: str, stage: str) -> bool:
    return STAGES.index(first_read_by(key)) <= STAGES.index(stage)


def first_read_by(key: str) -> str | None:
    """The stage of a dotted key, or of the nearest section above it (a dict value's own keys are not in the schema)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in FIRST_READ_BY:
            return FIRST_READ_BY[".".join(parts[:end])]
    raise KeyError(f"{key} is not a params key")


def is_under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat
