"""The one exception type users see: its message says what is wrong, where, and what to do."""

from __future__ import annotations

import errno
import io
import shutil
import signal
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class TunebookError(Exception):
    """Bad input or a missing prerequisite; the CLI prints the message alone, without a traceback."""


class FileSystemError(TunebookError):
    """A file or folder could not be read, written or created: the message names the operation, the path and why."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was (like Ctrl-C's KeyboardInterrupt), so stages and the CLI can record it."""


def _raise_terminated(signum, frame):
    raise Terminated("SIGTERM")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, a SIGTERM raises Terminated in the main thread instead of ending the process on the spot.
    Elsewhere than the main thread (signals cannot be handled there) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def signal_name(interrupt: BaseException) -> str:
    return "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C (SIGINT)"


# File-system errors: the OSErrors whose cause is a path (network errors are OSErrors too, and are left alone).
FS_ERRNOS = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
    errno.ENOTEMPTY,
    errno.EXDEV,
    errno.EFBIG,
    errno.ELOOP,
    errno.EBUSY,
    errno.ETXTBSY,
}
# What a failing call was doing, by the name of the library function (pathlib, os, shutil, io) it failed in.
OPERATIONS = {
    "mkdir": "create the folder",
    "makedirs": "create the folder",
    "touch": "create",
    "write_text": "write",
    "write_bytes": "write",
    "write": "write",
    "dump": "write",
    "save": "write",
    "read_text": "read",
    "read_bytes": "read",
    "read": "read",
    "load": "read",
    "rename": "rename",
    "replace": "replace",
    "move": "move",
    "unlink": "delete",
    "remove": "delete",
    "rmdir": "remove the folder",
    "rmtree": "remove the folder",
    "copy": "copy",
    "copy2": "copy",
    "copyfile": "copy",
    "copytree": "copy",
    "copystat": "copy",
    "iterdir": "list the folder",
    "listdir": "list the folder",
    "scandir": "list the folder",
    "glob": "list the folder",
    "rglob": "list the folder",
    "chmod": "change the permissions of",
    "stat": "read",
    "open": "open",
}


def is_file_system_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and not isinstance(error, ConnectionError) and (error.filename is not None or error.errno in FS_ERRNOS)


def file_system_error(error: OSError, what: str = "", hint: str = "", shown_path: str | Path | None = None, operation: str = "") -> FileSystemError:
    """The error in the user's terms: "Cannot create the folder X: Y is a file, not a folder." `what` names the thing
    (e.g. "the run folder"), `hint` says what to do, `shown_path` replaces a path the user never gave (a temporary
    file beside it); the operation, unless given, is read off the traceback."""
    path, path2 = _paths(error)
    path = str(shown_path) if shown_path is not None else path
    operation = operation or _operation(error)
    target = f"{what} {path}" if what and path else what or path or "a file"
    if operation.startswith("create the folder") and what:
        operation = "create"
    message = f"Cannot {operation} {target}"
    if path2:
        message += f" to {path2}"
    message += f": {_reason(error, path)}."
    return FileSystemError(message + (f" {hint}" if hint else ""))


def _paths(error: OSError) -> tuple[str | None, str | None]:
    path = error.filename
    if path is None:  # a write to an open file (a full disk): the file object in the failing frames names it
        tb = error.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                    path = value.name
            tb = tb.tb_next
    return (None if path is None else str(path)), (None if error.filename2 is None else str(error.filename2))


def _operation(error: OSError) -> str:
    """The outermost library call (below our own code) with a known meaning, e.g. Path.mkdir -> "create the folder"."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = str(Path(__file__).resolve().parent) + "/"
    outside = [f for f in frames if not str(Path(f.filename).resolve()).startswith(ours)]
    for frame in outside:
        if frame.name in OPERATIONS:
            return OPERATIONS[frame.name]
    line = frames[-1].line if frames else ""
    if line and "open(" in line:  # the builtin open, called from our code
        return "write" if any(f'"{m}' in line or f"'{m}" in line for m in "wax") else "open"
    return "use"


def _reason(error: OSError, path: str | None) -> str:
    code = error.errno
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST) and path:
        blocker = _file_in_the_way(Path(path))
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
        if code == errno.ENOENT:
            parent = Path(path).parent
            return "it does not exist" if parent.is_dir() else f"the folder {parent} does not exist"
        if code == errno.EEXIST:
            return "it already exists"
    if code == errno.EISDIR:
        return "it is a folder, not a file"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied (the folder or file is read-only for you)"
    if code == errno.EROFS:
        return "the file system is read-only"
    if code == errno.ENOSPC:
        return "no space left on the disk" + _free_space(path)
    if code == errno.EDQUOT:
        return "the disk quota is used up" + _free_space(path)
    return error.strerror or str(error)


def _file_in_the_way(path: Path) -> Path | None:
    """The path itself or the nearest existing folder above it, when that is a file."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _free_space(path: str | None) -> str:
    if not path:
        return ""
    existing = next((p for p in [Path(path), *Path(path).parents] if p.exists()), None)
    try:
        free = shutil.disk_usage(existing).free
    except (OSError, TypeError):
        return ""
    return f" ({free / 1e6:.0f} MB free where {path} is)"
