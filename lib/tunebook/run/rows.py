"""Row files, read and written the same way by every stage: UTF-8 text with the bad byte named, JSONL with the bad
line named, dotted field names into nested records. A leaf module: it imports nothing of the stages."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tunebook.errors import TunebookError


class DataError(TunebookError):
    pass


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text (bad byte 0x{raw[e.start]:02x} on line {line}). Re-save it as UTF-8.") from None


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """The objects of a UTF-8 JSONL file (blank lines skipped), or its first `limit`; a bad line is named by its number.
    Read line by line: a huge file's first rows cost only those, and a line ends only at a newline (not at U+2028)."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text (bad byte 0x{raw[e.start]:02x} on line {number}). Re-save it as UTF-8.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number}: not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, UTF-8 (not ASCII-escaped)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def field_value(row: dict, name: str):
    """row[name]; a dotted name reaches into nested records, e.g. answers.text for SQuAD on the hub."""
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
