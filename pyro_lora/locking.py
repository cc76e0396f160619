"""One writer per run folder: an OS file lock (``flock``) on ``<folder>/.lock``."""

import contextlib
import os
import stat
import threading
import time
from pathlib import Path

from .io import _naming_errors

try:
    import fcntl
except ImportError:  # not POSIX: folder_lock refuses to run
    fcntl = None


class FolderLocked(ValueError):
    """Another process holds the folder :func:`folder_lock` was asked for."""


_HELD = {}  # (resolved lock file, process, thread) -> its descriptor held there (the locks are re-entrant)
_PATIENCE = 1.0  # seconds a lock held elsewhere is tried again: a locked_elsewhere probe holds it for microseconds


@contextlib.contextmanager
def folder_lock(path, what="this folder"):
    """Hold an exclusive lock on ``path/.lock`` for the block: a second process writing the same folder would
    interleave two sets of rows. The lock is the kernel's (``flock``): it goes with its process, so a lock a killed
    run left needs no takeover, and the process id written in the file only names the holder in the error. The file
    stays when the block ends (removing it could remove the one another process has just locked). A lock this thread
    holds already (the study's, around the comparison it runs there) is held on; another thread's, or a forked
    parent's, is refused like another process's.

    :raises FolderLocked: if another process holds it (naming its id).
    :raises ValueError: if ``path`` is a file, or ``path/.lock`` is not a regular file this can lock (a link, a folder,
        a pipe, a file of another user), naming it.
    :raises RuntimeError: on a platform without POSIX file locks.
    """
    folder = Path(path).resolve()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{path} is a file, where a folder is to be written: move it")
    folder.mkdir(parents=True, exist_ok=True)
    with _held(folder / ".lock", what):
        yield


@contextlib.contextmanager
def slot_lock(path, what):
    """Hold an exclusive lock on ``.<name>.lock`` beside ``path`` for the block: for a folder each write replaces whole
    (a checkpoint, :func:`~pyro_lora.io.atomic_directory`), whose own ``.lock`` would go with the folder it replaces.
    Not re-entrant: a second writer in this thread (a fit a callback of another starts) would replace the first's.

    :raises FolderLocked: if another process or thread holds it (naming its id), or this thread already does.
    """
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _held(target.parent / f".{target.name}.lock", what, reentrant=False):
        yield


@contextlib.contextmanager
def _held(lock, what, reentrant=True):
    """``flock`` the file ``lock`` for the block; again in the thread holding it, ``reentrant`` or refused."""
    key = (lock, os.getpid(), threading.get_ident())
    if key in _HELD:
        if not reentrant:
            raise FolderLocked(f"this thread (process {os.getpid()}) is already writing {what} ({lock}): one writer at "
                               "a time; give the second its own")
        yield
        return
    _HELD[key] = _acquire(lock, what)
    try:
        yield
    finally:
        fd = _HELD.pop(key, None)  # None in a forked child: it closed its copy at the fork
        if fd is not None:
            os.close(fd)


def _forget_locks_at_fork():
    """In a forked child (a DataLoader worker), close the inherited lock descriptors: the lock must end with the
    parent's block, not with the last child that shares it."""
    for fd in _HELD.values():
        os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_at_fork)


def _acquire(lock, what):
    """Open and ``flock`` ``lock``, returning the descriptor, with this process's id written in it."""
    if fcntl is None:
        raise RuntimeError("run folders are locked with POSIX file locks (fcntl), which this platform lacks")
    deadline = time.monotonic() + _PATIENCE
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise ValueError(f"{lock} cannot be opened as this folder's lock file ({e.strerror}): remove it") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{lock} is not a regular file, so it cannot be this folder's lock file: remove it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise FolderLocked(f"{holder} is writing {what} ({lock}): wait for it, or stop it first") from None
        except OSError as e:
            os.close(fd)
            raise ValueError(f"{lock} cannot be locked as this folder's lock file ({e.strerror}): remove it") from None
        except ValueError:
            os.close(fd)
            raise
        try:  # someone may have removed or replaced the file since this open: lock the one there now
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            try:
                with _naming_errors(lock):  # a full disk
                    os.ftruncate(fd, 0)
                    os.write(fd, str(os.getpid()).encode())
            except OSError:
                os.close(fd)
                raise
            return fd
        os.close(fd)


def _lock_holder(fd):
    """'process <id>' as the holder of the lock file ``fd`` wrote it, or 'another process' if it wrote none yet."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"process {text}" if text.isdigit() else "another process"


def locked_elsewhere(path):
    """Whether another process (or thread) holds :func:`folder_lock` on ``path`` now (it may be writing there);
    ``False`` where there is no lock file this can open. Its probe holds the lock for an instant, which a
    :func:`folder_lock` starting then waits out."""
    lock = Path(path).resolve() / ".lock"
    if (lock, os.getpid(), threading.get_ident()) in _HELD or fcntl is None:
        return False
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # none, gone, a link, another user's
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False
