"""Replace a whole folder atomically: the way every checkpoint is written.

:func:`staged_folder` hands out an empty temporary sibling of the target; once the
caller has written everything into it, the files it does not replace are carried
over from the old folder (hard links, so nothing is copied and the old folder stays
whole), everything is flushed to disk, and the two folders are exchanged in one
``renameat2(RENAME_EXCHANGE)`` (Linux; ``renamex_np(RENAME_SWAP)`` on macOS).  A
process killed at any point therefore leaves the complete old folder or the complete
new one at the target path, plus at worst a hidden ``.<name>.hf_adanorm-tmp-*``
sibling that the next save into the same folder deletes.  Where the system has no
exchange call the old folder is moved aside and the new one renamed in: then, only
between those two renames, the target path is briefly absent (both folders are whole).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_TMP_MARK = ".hf_adanorm-tmp-"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{_TMP_MARK}"


def _staging_match(name: str, target_name: str):
    """The match of a staging folder's name for ``target_name`` (group 1: the saving process's pid)."""
    return re.fullmatch(re.escape(f".{target_name}{_TMP_MARK}") + r"(\d+)-[0-9a-f]+(-old)?", name)


def is_staging_leftover(name: str, target_name: str) -> bool:
    """Whether ``name`` is a staging folder of a save of ``target_name``: what a kill left beside it."""
    return _staging_match(name, target_name) is not None


def check_target(target) -> Path:
    """The absolute folder to save into; raises (before anything is written) where it cannot be
    replaced atomically: a file in its place, a mount point, an unwritable parent."""
    target = Path(os.path.realpath(os.fspath(target)))  # a symlinked folder: the folder it points to
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save into {target}: it is a file, not a folder")
    cwd = Path(os.getcwd())
    if target.is_dir() and (cwd == target or target in cwd.parents):
        raise OSError(errno.EBUSY, f"cannot replace {target} atomically: it is (or holds) the current working "
                                   "folder, which would then point into the deleted old folder; save into a "
                                   "subfolder, or from another working folder")
    if target.is_dir() and os.path.ismount(target):
        raise OSError(errno.EBUSY, f"cannot save into {target} atomically: it is a mount point, which cannot "
                                   "be renamed; save into a subfolder of it")
    parent = next((p for p in (target.parent, *target.parent.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save into {target}: {parent} is not a writable folder (a checkpoint is "
                              "written into a temporary folder next to its target, then swapped in)")
    return target


def _exchange_call() -> Callable[[bytes, bytes], int] | None:
    """The system's atomic exchange of two paths, as ``f(a, b) -> 0 or -1``, or None."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        return lambda a, b: libc.renameat2(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        return lambda a, b: libc.renamex_np(a, b, rename_swap)
    return None


def _swap(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; the old ``target`` (if any) ends up at ``new``'s path."""
    if not target.exists():
        os.rename(new, target)
        return
    exchange = _exchange_call()
    if exchange is not None:
        if exchange(os.fsencode(new), os.fsencode(target)) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # a real failure, not "unsupported here"
            raise OSError(code, f"cannot swap the new checkpoint into {target}: {os.strerror(code)}")
    aside = new.with_name(new.name + "-old")
    os.rename(target, aside)
    os.rename(new, target)
    os.rename(aside, new)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a folder; the data files were synced
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _link_tree(source: Path, destination: Path) -> None:
    """Hard-link ``source`` (file or folder) at ``destination``; copy where links are refused."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:  # another file system, or links not allowed: a real copy
            shutil.copy2(src, dst, follow_symlinks=False)
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, destination, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(source, destination)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path) -> None:
    """Delete temporary siblings of ``target`` left by killed saves (not those of live ones)."""
    for path in target.parent.glob(f"{glob.escape(_tmp_prefix(target))}*"):
        found = _staging_match(path.name, target.name)
        if found and (int(found.group(1)) == os.getpid() or not _pid_alive(int(found.group(1)))):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_folder(target, replaces: Callable[[str], bool]) -> Iterator[Path]:
    """Yield an empty folder to write the new contents of ``target`` into; on success swap it in.

    Entries of the old folder for which ``replaces(name)`` is false (a tokenizer, a Trainer's
    ``checkpoint-*`` folders ...) are carried into the new folder; the others are dropped, so a
    stale file of an earlier save never contradicts the new one.  On an exception the temporary
    folder is deleted and ``target`` is untouched.
    """
    target = check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    staging = target.parent / f"{_tmp_prefix(target)}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        if target.is_dir():
            for entry in target.iterdir():
                if not replaces(entry.name) and not (staging / entry.name).exists():
                    _link_tree(entry, staging / entry.name)
        _sync_tree(staging)
        _swap(staging, target)  # the commit point
        _fsync(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old folder after a swap, else the aborted one
