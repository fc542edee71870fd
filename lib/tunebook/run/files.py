"""Files written safely: JSON replaced atomically, a folder swapped into place whole, a shared cache entry built once
by whichever process finishes first. A crash or a full disk never leaves a half-written file where a whole one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tunebook.errors import file_system_error, is_file_system_error


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        if not is_file_system_error(e):
            raise
        try:
            tmp.unlink(missing_ok=True)  # a half-written one (a full disk)
        except OSError:
            pass
        raise file_system_error(e, shown_path=path) from None  # the user knows the file, not its temporary twin


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a freshly written folder into place, so a crash never leaves a half-written one behind."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def build_once(final: Path) -> Iterator[Path]:
    """A folder of its own to build a shared cache entry in (a materialized model, a tool), moved to `final` when
    the block ends. Two processes may build the same entry at once (two test workers, two notebooks): whichever
    finishes second drops its copy and keeps the first. A build that raises leaves nothing behind; one that is
    killed leaves a hidden `.<name>.*.tmp` folder beside the entry."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise
            # another process finished first: renaming onto its non-empty folder fails, and its copy is as good
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_tmp_dir(final: Path) -> Path:
    """The one folder a run's output is written in before `replace_dir` swaps it in. Its name is fixed, so a write
    that crashed is cleared by the next try; one process writes a run's stage at a time (the manifest sees to that).
    A cache that several processes may fill at once uses `build_once` instead."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
