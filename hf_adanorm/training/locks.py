"""One process at a time in a run folder or a sweep folder.

Two trainings writing into one folder interleave their checkpoints, metrics.json and model/,
and two ``hf-adanorm compare`` on one sweep folder train every run twice (or crash on each
other's files). The lock is ``filelock.FileLock`` on ``<folder>/.lock``: an ``flock`` that the
kernel releases when its process ends, however it ends (``kill -9`` included), so the lock of
a dead process is recovered by the next one that asks, with nothing to clean up. Beside it,
``.lock.owner`` (pid, host, kind, start time, command line) names the holder in the refusal.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .checkpoints import write_json_atomic

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
_held: dict[Path, int] = {}  # folders this process holds -> nesting depth (compare() around run_sweep())


class FolderInUseError(BlockingIOError):
    """Another live process holds the folder's lock (an OSError, as a busy file is)."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner(folder) -> dict | None:
    """The owner file of ``folder``'s lock, or None while it is missing or half written."""
    try:
        owner = json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe_holder(folder) -> str:
    """Who holds (or last held) the lock of ``folder``, from its owner file."""
    owner = _owner(folder)
    if owner is None:
        return "a process that has not said who it is yet"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    text = f"pid {owner.get('pid')} on host {owner.get('host')} (since {since}: {owner.get('command', '?')})"
    if owner.get("host") == socket.gethostname() and not _process_alive(int(owner.get("pid", 0))):
        text += "; that process has ended, so a process it started may still hold the lock"
    return text


def _refusal(folder: Path, what: str) -> FolderInUseError:
    # the holder's own kind: a training run may hold the folder a conversion asks for
    kind = (_owner(folder) or {}).get("what") or what
    return FolderInUseError(f"{folder} is in use by another {kind}: {describe_holder(folder)}. Wait for it "
                            "to finish (or stop it), or use another folder")


def _check_plain(path: Path) -> None:
    """A lock file that is a link would lock its target (another folder's lock, or a loop that fails
    with 'Too many levels of symbolic links'): refuse it, saying what to do."""
    if path.is_symlink():
        raise FileExistsError(f"{path} is a link (to {os.readlink(path)}), not a lock file: delete it and rerun; "
                              "nothing else was changed")


def check_not_in_use(folder, what: str) -> None:
    """Refuse early, writing nothing new, when a live process holds ``folder``'s lock."""
    path = Path(folder) / LOCK_FILE
    _check_plain(path)
    if not path.is_file() or Path(folder).resolve() in _held:
        return  # never locked: nothing to ask (and no file to create before the real checks)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise _refusal(Path(folder), what) from None
    lock.release()


@contextmanager
def folder_lock(folder, what: str):
    """Hold ``folder``'s lock (creating the folder) for the ``with`` block, or refuse at once.

    ``what`` names the kind of user in the refusal, e.g. "training run" or "hf-adanorm compare".
    A process that holds the lock already may take it again, nested.
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    _check_plain(folder / LOCK_FILE)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise _refusal(folder, what) from None
    _held[key] = 1
    try:
        write_json_atomic(folder / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                                "started": time.time(), "command": " ".join(sys.argv)})
        yield
    finally:
        del _held[key]
        (folder / OWNER_FILE).unlink(missing_ok=True)
        lock.release()
